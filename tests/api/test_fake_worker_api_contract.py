"""The fake ``/internal/v1`` of ``tests/worker/fake_api.py`` answers like the real app.

The worker tests run against that fake (a second implementation of the protocol). Here the real worker
code (``execute_job``: claim, staging, supervisor, the fake trainer as its child) runs the same scenarios
once against the fake and once against the real app on a real database, served over loopback HTTP, and
every request the worker made is recorded on its side of the wire. For each endpoint the worker called
on the fake it must have called on the app too, with the same status codes and 2xx bodies of the same
shape (the same keys), and each scenario must end with the same outcome. A change to either side that
the other does not follow fails here.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.main import create_app
from app.settings import Settings
from tests.api.conftest import WORKER, RecordingDoorbell
from tests.worker.conftest import TRAINER_ARGV, claim_body
from tests.worker.fake_api import TOKEN, FakeApi, State
from worker.api_client import ApiClient
from worker.settings import WorkerSettings
from worker.supervisor import Outcome
from worker.tasks import execute_job

Shape = tuple[str, frozenset[str]]
"""``("ok", keys of the JSON body)`` or ``("error", keys of its "error" object)``."""


@dataclass
class Recorder(httpx.BaseTransport):
    """An httpx transport that records every request the worker sends and the shape of each answer."""

    inner: httpx.BaseTransport
    sent: set[str] = field(default_factory=set)
    """``POST /internal/v1/jobs/{id}/heartbeat``: method and path with its ids replaced (recorded when sent,
    so a long-poll still held when the client closes counts too)."""
    shapes: dict[str, set[Shape]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = re.sub(r"^/internal/v1/(jobs|files)/[^/]+", r"/internal/v1/\1/{id}", request.url.path)
        endpoint = f"{request.method} {path}"
        with self.lock:
            self.sent.add(endpoint)
        response = self.inner.handle_request(request)
        response.read()
        shape: Shape | None = None
        if response.headers.get("content-type", "").startswith("application/json"):
            body = response.json()
            if response.is_success and isinstance(body, dict):
                shape = ("ok", frozenset(body))
            elif isinstance(body, dict) and isinstance(body.get("error"), dict):
                shape = ("error", frozenset(body["error"]))
        if shape is not None:
            with self.lock:
                self.shapes.setdefault(endpoint, set()).add(shape)
        return response

    def answers(self, endpoint: str, kind: str) -> set[frozenset[str]]:
        return {keys for k, keys in self.shapes.get(endpoint, set()) if k == kind}


OPENAI_ERROR = frozenset({"message", "type", "param", "code"})


@dataclass(frozen=True)
class Scenario:
    name: str
    env: dict[str, str]
    action: str | None = None
    """``cancel``/``pause``: asked for once the trainer has reported two steps."""


SCENARIOS = [
    Scenario("succeeds", {"FAKE_STEPS": "5", "FAKE_DELAY": "0.05", "FAKE_CHECKPOINT_EVERY": "2"}),
    Scenario("cancelled", {"FAKE_STEPS": "100000", "FAKE_DELAY": "0.05"}, action="cancel"),
    Scenario("paused", {"FAKE_STEPS": "100000", "FAKE_DELAY": "0.05"}, action="pause"),
    Scenario("fails", {"FAKE_MODE": "error"}),
]


def _worker_settings(tmp: Path, api_url: str, token: str) -> WorkerSettings:
    models = tmp / "worker-models"
    (models / "tiny-mistral").mkdir(parents=True, exist_ok=True)
    (models / "tiny-mistral" / "config.json").write_text("{}")
    return WorkerSettings(
        var_dir=tmp / "worker-var",
        api_url=api_url,
        worker_token=SecretStr(token),
        models_dir=models,
        work_dir=tmp / "work",
        heartbeat_seconds=0.3,
        stop_grace_seconds=3,
        worker_id="contract-worker",
        keep_work_dirs=True,
    )


def _run(
    settings: WorkerSettings, job_id: str, scenario: Scenario, ask: Callable[[str], None], steps: Callable[[], int]
) -> tuple[Outcome | None, Recorder]:
    recorder = Recorder(httpx.HTTPTransport())
    api = ApiClient(settings.api_url, settings.resolve_worker_token(), retry_seconds=10, transport=recorder)

    def during(_: object) -> None:
        if scenario.action is None:
            return

        def later() -> None:
            deadline = time.monotonic() + 30
            while steps() < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            ask(scenario.action or "")

        threading.Thread(target=later, daemon=True).start()

    try:
        outcome = execute_job(
            job_id,
            settings,
            api=api,
            trainer_argv=TRAINER_ARGV,
            env={**os.environ, **scenario.env},
            on_supervisor=during,
        )
    finally:
        api.close()
    return outcome, recorder


@pytest.fixture
def live_app(settings: Settings) -> Iterator[str]:
    """The real app on a loopback port (the worker talks HTTP to it, as to the fake)."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, doorbell=RecordingDoorbell()), host="127.0.0.1", port=0, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the app did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_the_fake_api_answers_the_worker_like_the_real_app(
    scenario: Scenario,
    live_app: str,
    client: TestClient,
    upload: Any,
    auth: dict[str, str],
    tmp_path: Path,
) -> None:
    # The real app: a queued job with a training and a validation file, as the fake's claim describes.
    train, valid = upload().json()["id"], upload().json()["id"]
    created = client.post(
        "/v1/fine_tuning/jobs",
        headers=auth,
        json={"model": "tiny-mistral", "training_file": train, "validation_file": valid, "seed": 7},
    )
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]

    def real_steps() -> int:
        events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=auth, params={"limit": 100}).json()
        return sum(1 for e in events["data"] if e["type"] == "metrics")

    def real_ask(action: str) -> None:
        answer = client.post(f"/v1/fine_tuning/jobs/{job_id}/{action}", headers=auth)
        assert answer.status_code == 200, answer.text

    token = WORKER["Authorization"].removeprefix("Bearer ")
    real_outcome, real = _run(
        _worker_settings(tmp_path / "real", live_app, token), job_id, scenario, real_ask, real_steps
    )

    # The fake, with the same scenario.
    state = State(claim=claim_body())
    state.files["file-train"] = b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    state.files["file-valid"] = b'{"prompt": "q", "chosen": "c", "rejected": "d"}\n'
    fake_api = FakeApi(state)
    fake_api.start()
    try:

        def fake_steps() -> int:
            with state.lock:
                return sum(1 for e in state.events if e["type"] == "metrics")

        def fake_ask(action: str) -> None:
            state.action = action

        fake_settings = _worker_settings(tmp_path / "fake", fake_api.url, TOKEN)
        fake_outcome, fake = _run(fake_settings, "ftjob-test1", scenario, fake_ask, fake_steps)
    finally:
        fake_api.stop()

    assert fake_outcome is not None and real_outcome is not None
    assert (fake_outcome.status, fake_outcome.reason) == (real_outcome.status, real_outcome.reason)
    # Heartbeats are sent on a timer: whether a short attempt sends one depends on timing, not on the API.
    timed = {"POST /internal/v1/jobs/{id}/heartbeat"}
    fake_sent, real_sent = fake.sent - timed, real.sent - timed
    assert fake_sent == real_sent, ("fake only:", fake_sent - real_sent, "real only:", real_sent - fake_sent)
    for endpoint in sorted(fake.sent):
        fake_ok, real_ok = fake.answers(endpoint, "ok"), real.answers(endpoint, "ok")
        # file content is not JSON; a held long-poll may still be open when the client closes
        if not endpoint.endswith(("/content", "/control")):
            assert fake_ok and real_ok, (endpoint, "no 2xx JSON answer", fake_ok, real_ok)
        if fake_ok and real_ok:
            assert fake_ok == real_ok, (endpoint, "fake:", fake_ok, "real:", real_ok)
        for side in (fake, real):
            assert side.answers(endpoint, "error") <= {OPENAI_ERROR}, (endpoint, side.answers(endpoint, "error"))
