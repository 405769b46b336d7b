"""Webhooks end to end: a real HTTP receiver on a loopback port verifies every delivery with the
``standardwebhooks`` package; retries, give-up, ``failing`` endpoints, bad URLs and tenancy."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from standardwebhooks import Webhook

from app.main import create_app
from app.settings import Settings
from tests.api import worker_steps
from tests.api.conftest import WORKER, RecordingDoorbell

LEAKED_BODY = "internal-only: db_password=hunter2"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    payload: dict[str, Any] | None
    """The verified payload; None when the signature did not verify."""


@dataclass
class Receiver:
    """A real HTTP server. Each path answers from its script of behaviours (an int status, "hang",
    "redirect" or "leak": a 500 with a body); the last entry repeats. Every request is verified with the
    endpoint's secret before it is answered."""

    base: str = ""
    secrets: dict[str, str] = field(default_factory=dict)
    scripts: dict[str, list[int | str]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    hang_seconds: float = 2.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                payload = Webhook(state.secrets[self.path]).verify(body, headers)
            except Exception:
                payload = None
            with state.lock:
                n = len([r for r in state.received if r.path == self.path])
                state.received.append(Received(self.path, headers, payload))
            script = state.scripts.get(self.path, [200])
            action = script[min(n, len(script) - 1)]
            if action == "hang":
                time.sleep(state.hang_seconds)
                action = 200
            if action == "redirect":  # to another path of this receiver: a sender must not follow it
                self.send_response(302)
                self.send_header("Location", state.base + "/redirected")
                self.end_headers()
                return
            if action == "leak":  # an internal service's error page: a sender must not echo it anywhere
                secret = LEAKED_BODY.encode()
                self.send_response(500)
                self.send_header("Content-Length", str(len(secret)))
                self.end_headers()
                self.wfile.write(secret)
                return
            self.send_response(400 if payload is None else int(action))
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

        def handle(self) -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the sender timed out and hung up
                super().handle()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def hooks_client(settings: Settings) -> Iterator[TestClient]:
    """The API with the webhook sender running, fast retries, and loopback receivers allowed."""
    fast = settings.model_copy(
        update={
            "run_webhook_sender": True,
            "webhook_allow_loopback": True,
            "webhook_poll_seconds": 0.05,
            "webhook_retry_base_seconds": 0.1,
            "webhook_timeout_seconds": 0.5,
            "webhook_max_attempts": 3,
            "webhook_failing_after": 3,
        }
    )
    with TestClient(create_app(fast, doorbell=RecordingDoorbell())) as c:
        yield c


def _register(client: TestClient, auth: dict[str, str], receiver: Receiver, path: str, **extra: Any) -> dict[str, Any]:
    r = client.post("/v1/webhooks", headers=auth, json={"url": receiver.base + path, **extra})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    receiver.secrets[path] = body["secret"]
    return body


def _job(client: TestClient, upload, auth: dict[str, str]) -> str:
    file_id = upload(headers=auth).json()["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": file_id})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def _wait(fetch: Callable[[], Any], done: Callable[[Any], bool] = bool, timeout: float = 10.0) -> Any:
    """Poll ``fetch`` until ``done`` holds for its result; return that result."""
    deadline = time.monotonic() + timeout
    while True:
        result = fetch()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s; last: {result!r}")
        time.sleep(0.05)


def _deliveries(client: TestClient, auth: dict[str, str], endpoint_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/v1/webhooks/{endpoint_id}/deliveries?limit=100", headers=auth)
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def _counter(outcome: str) -> float:
    return REGISTRY.get_sample_value("ipo_webhook_deliveries_total", {"outcome": outcome}) or 0.0


def test_job_events_arrive_signed_and_verifiable(hooks_client: TestClient, receiver: Receiver, upload, auth) -> None:
    client = hooks_client
    succeeded_before = _counter("succeeded")
    everything = _register(client, auth, receiver, "/all", description="all events")
    assert everything["secret"].startswith("whsec_") and everything["events"] is None
    assert everything["status"] == "active" and everything["object"] == "webhook_endpoint"
    only_cancel = _register(client, auth, receiver, "/cancel", events=["fine_tuning.job.cancelled"])

    listed = client.get("/v1/webhooks", headers=auth).json()["data"]
    assert {e["id"] for e in listed} == {everything["id"], only_cancel["id"]}
    assert all(e["secret"] is None for e in listed)  # shown once, at creation
    assert client.get(f"/v1/webhooks/{everything['id']}", headers=auth).json()["secret"] is None

    done = _job(client, upload, auth)
    worker_steps.succeed(client, WORKER, done)  # claim, checkpoint at step 1, adapter, finish
    cancelled = _job(client, upload, auth)
    assert client.post(f"/v1/fine_tuning/jobs/{cancelled}/cancel", headers=auth).status_code == 200

    got = _wait(lambda: receiver.at("/all"), lambda r: len(r) >= 3)
    assert all(r.payload is not None for r in got), "every delivery verifies with the endpoint's secret"
    by_type = {r.payload["type"]: r for r in got if r.payload}
    assert set(by_type) == {
        "fine_tuning.job.checkpoint.created",
        "fine_tuning.job.succeeded",
        "fine_tuning.job.cancelled",
    }
    ok = by_type["fine_tuning.job.succeeded"]
    assert ok.payload is not None
    assert ok.payload["id"].startswith("evt_") and ok.headers["webhook-id"] == ok.payload["id"]
    assert ok.payload["data"]["id"] == done and ok.payload["data"]["status"] == "succeeded"
    assert ok.payload["data"]["object"] == "fine_tuning.job" and ok.payload["data"]["fine_tuned_model"]
    assert ok.headers["webhook-signature"].startswith("v1,")
    ckpt = by_type["fine_tuning.job.checkpoint.created"].payload
    assert ckpt is not None and ckpt["data"]["object"] == "fine_tuning.job.checkpoint"
    assert ckpt["data"]["fine_tuning_job_id"] == done and ckpt["data"]["step_number"] == 1
    assert by_type["fine_tuning.job.cancelled"].payload["data"]["status"] == "cancelled"

    # The filtered endpoint got the cancellation only, verified with its own secret.
    _wait(lambda: receiver.at("/cancel"))
    time.sleep(0.3)
    only = receiver.at("/cancel")
    assert [r.payload["type"] for r in only if r.payload] == ["fine_tuning.job.cancelled"] and len(only) == 1

    log = _wait(
        lambda: _deliveries(client, auth, everything["id"]), lambda d: all(x["status"] == "succeeded" for x in d)
    )
    assert len(log) == 3 and {d["event_type"] for d in log} == set(by_type)
    assert all(d["attempts"] == 1 and d["response_status_code"] == 200 and d["delivered_at"] for d in log)
    assert _counter("succeeded") >= succeeded_before + 4


def test_a_failing_receiver_is_retried_until_it_answers(
    hooks_client: TestClient, receiver: Receiver, upload, auth
) -> None:
    client = hooks_client
    receiver.scripts["/flaky"] = [500, 200]
    endpoint = _register(client, auth, receiver, "/flaky", events=["fine_tuning.job.cancelled"])
    job = _job(client, upload, auth)
    assert client.post(f"/v1/fine_tuning/jobs/{job}/cancel", headers=auth).status_code == 200

    log = _wait(lambda: _deliveries(client, auth, endpoint["id"]), lambda d: d and d[0]["status"] == "succeeded")
    assert log[0]["attempts"] == 2 and log[0]["response_status_code"] == 200 and log[0]["last_error"] is None
    attempts = receiver.at("/flaky")
    assert len(attempts) == 2 and attempts[0].headers["webhook-id"] == attempts[1].headers["webhook-id"]
    assert all(a.payload is not None for a in attempts)
    assert client.get(f"/v1/webhooks/{endpoint['id']}", headers=auth).json()["status"] == "active"


def test_a_hanging_receiver_is_given_up_on_and_slows_nothing_down(
    hooks_client: TestClient, receiver: Receiver, upload, auth
) -> None:
    client = hooks_client
    receiver.scripts["/slow"] = ["hang"]
    slow = _register(client, auth, receiver, "/slow", events=["fine_tuning.job.cancelled"])
    fast = _register(client, auth, receiver, "/fast", events=["fine_tuning.job.cancelled"])
    first, second = _job(client, upload, auth), _job(client, upload, auth)
    assert client.post(f"/v1/fine_tuning/jobs/{first}/cancel", headers=auth).status_code == 200
    _wait(lambda: receiver.at("/slow"))  # the sender is now waiting on the hanging receiver

    started = time.monotonic()
    assert client.post(f"/v1/fine_tuning/jobs/{second}/cancel", headers=auth).status_code == 200
    assert time.monotonic() - started < 1.0, "a job transition never waits for a webhook receiver"
    # The healthy endpoint gets both events while the slow one is still hanging.
    _wait(lambda: receiver.at("/fast"), lambda r: len(r) >= 2, timeout=1.5)

    log = _wait(lambda: _deliveries(client, auth, slow["id"]), lambda d: d and all(x["status"] == "failed" for x in d))
    assert len(log) == 2
    assert all(
        d["attempts"] == 3 and "Timeout" in (d["last_error"] or "") and d["next_attempt_at"] is None for d in log
    )
    assert client.get(f"/v1/webhooks/{slow['id']}", headers=auth).json()["status"] == "failing"
    assert any(e["status"] == "failing" for e in client.get("/v1/webhooks", headers=auth).json()["data"])
    assert client.get(f"/v1/webhooks/{fast['id']}", headers=auth).json()["status"] == "active"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"url": "ftp://example.com/hook"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "http://user:pw@example.com/hook"}, "url"),
        ({"url": "http://127.0.0.1:9/hook"}, "url"),  # loopback, IPO_WEBHOOK_ALLOW_LOOPBACK is off
        ({"url": "http://localhost/hook"}, "url"),
        ({"url": "http://[::1]:8080/hook"}, "url"),
        ({"url": "http://169.254.169.254/latest/meta-data"}, "url"),  # link-local (cloud metadata)
        ({"url": "http://testserver/hook"}, "url"),  # this service itself (its own host:port)
        ({"url": "https://example.com/hook", "events": ["fine_tuning.job.exploded"]}, "events"),
        ({"url": "https://example.com/hook", "secret": "mine"}, "secret"),
    ],
)
def test_bad_webhooks_are_refused(client: TestClient, auth, body: dict[str, Any], param: str) -> None:
    r = client.post("/v1/webhooks", headers=auth, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_own_port_on_loopback_is_refused_even_when_loopback_is_allowed(hooks_client: TestClient, auth) -> None:
    r = hooks_client.post("/v1/webhooks", headers=auth, json={"url": "http://127.0.0.1:80/hook"})
    assert r.status_code == 400 and "itself" in r.json()["error"]["message"]


def test_another_projects_webhook_is_not_found(
    hooks_client: TestClient, receiver: Receiver, upload, auth, other_auth
) -> None:
    client = hooks_client
    mine = _register(client, auth, receiver, "/mine")
    for method, path in (
        ("GET", f"/v1/webhooks/{mine['id']}"),
        ("GET", f"/v1/webhooks/{mine['id']}/deliveries"),
        ("DELETE", f"/v1/webhooks/{mine['id']}"),
    ):
        r = client.request(method, path, headers=other_auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, path)
    assert client.get("/v1/webhooks", headers=other_auth).json()["data"] == []
    # The other project's jobs never reach my endpoint.
    theirs = _job(client, upload, other_auth)
    assert client.post(f"/v1/fine_tuning/jobs/{theirs}/cancel", headers=other_auth).status_code == 200
    time.sleep(0.3)
    assert receiver.at("/mine") == []

    r = client.delete(f"/v1/webhooks/{mine['id']}", headers=auth)
    assert r.status_code == 200 and r.json() == {"id": mine["id"], "object": "webhook_endpoint", "deleted": True}
    assert client.get(f"/v1/webhooks/{mine['id']}", headers=auth).status_code == 404
    assert json.loads(client.get("/v1/webhooks", headers=auth).text)["data"] == []
