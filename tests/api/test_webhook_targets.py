"""Webhook targets that would reach private services (SSRF) are refused, in every spelling, at creation
and again at each delivery (DNS rebinding); deliveries follow no redirect, echo no receiver's body, and
count every failure, whatever raised it (a stored URL with CR/LF included)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.main import create_app
from app.models import WebhookDelivery, WebhookEndpoint
from app.models.base import new_id, utcnow
from app.services import webhook_targets
from app.services.webhook_targets import TargetPolicy, effective_address, kind_of
from app.services.webhooks import new_secret
from app.settings import Settings
from tests.api.conftest import RecordingDoorbell
from tests.api.test_webhooks import LEAKED_BODY, Receiver, _deliveries, _job, _register, _wait, hooks_client, receiver

__all__ = ["hooks_client", "receiver"]  # fixtures used below

ip = ipaddress.ip_address


@pytest.mark.parametrize(
    ("address", "reaches", "kind"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:7f00:1", "127.0.0.1", "loopback"),  # the same, hex spelling
        ("::127.0.0.1", "127.0.0.1", "loopback"),  # IPv4-compatible (deprecated)
        ("64:ff9b::7f00:1", "127.0.0.1", "loopback"),  # NAT64 well-known prefix
        ("2002:7f00:1::", "127.0.0.1", "loopback"),  # 6to4
        ("::ffff:169.254.169.254", "169.254.169.254", "link-local"),  # cloud metadata
        ("64:ff9b::a9fe:a9fe", "169.254.169.254", "link-local"),
        ("::ffff:10.1.2.3", "10.1.2.3", "private"),
        ("::1", "::1", "loopback"),
        ("::", "::", "unspecified"),
        ("0.0.0.0", "0.0.0.0", "unspecified"),
        ("0.1.2.3", "0.1.2.3", "unspecified"),
        ("fe80::1", "fe80::1", "link-local"),
        ("fd00::1", "fd00::1", "private"),  # unique local
        ("100.64.0.1", "100.64.0.1", "private"),  # CGNAT
        ("192.0.2.10", "192.0.2.10", "private"),  # documentation
        ("240.0.0.1", "240.0.0.1", "private"),  # reserved
        ("224.0.0.1", "224.0.0.1", "multicast"),
        ("ff02::1", "ff02::1", "multicast"),
        ("8.8.8.8", "8.8.8.8", "global"),
        ("::ffff:8.8.8.8", "8.8.8.8", "global"),
        ("2606:4700:4700::1111", "2606:4700:4700::1111", "global"),
    ],
)
def test_addresses_are_judged_as_the_address_the_connection_reaches(address: str, reaches: str, kind: str) -> None:
    assert effective_address(ip(address)) == ip(reaches)
    assert kind_of(ip(address)) == kind


def test_policy_knobs() -> None:
    strict = TargetPolicy()
    assert strict.refusal(ip("8.8.8.8")) is None
    assert "IPO_WEBHOOK_ALLOW_LOOPBACK" in (strict.refusal(ip("::ffff:127.0.0.1")) or "")
    assert "IPO_WEBHOOK_ALLOWED_NETWORKS" in (strict.refusal(ip("10.0.0.1")) or "")
    loopback = TargetPolicy(allow_loopback=True)
    assert loopback.refusal(ip("::ffff:7f00:1")) is None and loopback.refusal(ip("::1")) is None
    assert loopback.refusal(ip("169.254.169.254")) is not None  # loopback only, never the metadata service
    private = TargetPolicy(allowed_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    assert private.refusal(ip("10.1.2.3")) is None and private.refusal(ip("::ffff:10.1.2.3")) is None
    assert private.refusal(ip("192.168.0.1")) is not None and private.refusal(ip("127.0.0.1")) is not None


REFUSED = [
    "http://[::ffff:127.0.0.1]:8080/x",
    "http://[::ffff:7f00:1]/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[::127.0.0.1]/",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "http://[2002:a9fe:a9fe::]/",
    "http://10.0.0.5/hook",
    "http://192.168.1.1/hook",
    "http://[fd00::1]/hook",
    "http://100.64.0.1/hook",
    "http://0.0.0.0:8080/hook",
    "http://224.0.0.1/hook",
    "http://[fe80::1]/hook",
    "http://192.0.2.10/hook",
]


@pytest.mark.parametrize("url", REFUSED)
def test_non_global_targets_are_refused_in_every_spelling(client: TestClient, auth, url: str) -> None:
    r = client.post("/v1/webhooks", headers=auth, json={"url": url})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "url" and error["code"] == "invalid_url" and "\n" not in error["message"]


@pytest.mark.parametrize(
    "url",
    ["http://[::ffff:127.0.0.1]:80/hook", "http://[::ffff:7f00:1]:80/hook", "http://[::127.0.0.1]:80/hook"],
)
def test_this_service_in_ipv6_spelling_is_refused_even_with_loopback_allowed(
    hooks_client: TestClient, auth, url
) -> None:
    r = hooks_client.post("/v1/webhooks", headers=auth, json={"url": url})
    assert r.status_code == 400 and "itself" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hook\r\nX-Injected: 1",
        "https://example.com/a\nb",
        "https://example.com/a\tb",
        "https://example.com/a b",
        "https://example.com/\x00",
        "https://example.com/\x7f",
        "https://exämple.com/hook",
    ],
)
def test_urls_with_control_characters_or_spaces_are_refused(client: TestClient, auth, url: str) -> None:
    r = client.post("/v1/webhooks", headers=auth, json={"url": url})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "url" and error["message"].startswith("url") and "\n" not in error["message"]


def test_the_allow_list_admits_a_private_network(settings: Settings, auth) -> None:
    allowed = settings.model_copy(update={"webhook_allowed_networks": [ipaddress.ip_network("10.0.0.0/8")]})
    with TestClient(create_app(allowed, doorbell=RecordingDoorbell())) as client:
        for url in ("http://10.1.2.3/hook", "http://[::ffff:10.1.2.3]/hook"):
            assert client.post("/v1/webhooks", headers=auth, json={"url": url}).status_code == 200, url
        r = client.post("/v1/webhooks", headers=auth, json={"url": "http://169.254.169.254/latest/meta-data/"})
        assert r.status_code == 400


def test_allowed_networks_setting_reads_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPO_WEBHOOK_ALLOWED_NETWORKS", "10.0.8.0/24, fd00::/8")
    nets = Settings().webhook_allowed_networks
    assert [str(n) for n in nets] == ["10.0.8.0/24", "fd00::/8"]
    monkeypatch.setenv("IPO_WEBHOOK_ALLOWED_NETWORKS", "")
    assert Settings().webhook_allowed_networks == []


# ---- at delivery time ----------------------------------------------------------------------------------


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[str]]]:
    """Names under ``.test`` resolve to what the test puts in the returned dict; other names as usual."""
    answers: dict[str, list[str]] = {}
    real: Callable[[str, int], list[Any]] = webhook_targets.resolve

    def resolve(host: str, port: int) -> list[Any]:
        if host.endswith(".test"):
            return [ip(a) for a in answers.get(host, [])]
        return real(host, port)

    monkeypatch.setattr(webhook_targets, "resolve", resolve)
    yield answers


def test_a_name_rebound_to_loopback_after_creation_is_refused_at_delivery(
    settings: Settings, receiver: Receiver, upload, auth, fake_dns
) -> None:
    strict = settings.model_copy(
        update={"run_webhook_sender": True, "webhook_poll_seconds": 0.05, "webhook_retry_base_seconds": 0.1}
    )
    port = receiver.base.rsplit(":", 1)[1]
    fake_dns["rebind.test"] = ["93.184.215.14"]  # public when the endpoint is created...
    with TestClient(create_app(strict, doorbell=RecordingDoorbell())) as client:
        endpoint = client.post("/v1/webhooks", headers=auth, json={"url": f"http://rebind.test:{port}/rebound"})
        assert endpoint.status_code == 200, endpoint.text
        fake_dns["rebind.test"] = ["127.0.0.1"]  # ...then re-pointed at this machine
        job = _job(client, upload, auth)
        assert client.post(f"/v1/fine_tuning/jobs/{job}/cancel", headers=auth).status_code == 200
        log = _wait(lambda: _deliveries(client, auth, endpoint.json()["id"]), lambda d: d and d[0]["attempts"] >= 1)
    assert log[0]["status"] == "pending" and log[0]["response_status_code"] is None
    assert log[0]["last_error"].startswith("TargetRefused: its host resolves to a loopback address")
    assert "127.0.0.1" not in log[0]["last_error"]  # what an internal name resolves to is not told
    assert receiver.at("/rebound") == []


def test_the_connection_goes_to_the_checked_address(
    hooks_client: TestClient, receiver: Receiver, upload, auth, fake_dns
) -> None:
    # "pinned.test" exists only in this test's resolver: the delivery can only arrive if the sender
    # connects to the address it checked, sending the name in Host, instead of resolving again.
    port = receiver.base.rsplit(":", 1)[1]
    fake_dns["pinned.test"] = ["127.0.0.1"]
    r = hooks_client.post("/v1/webhooks", headers=auth, json={"url": f"http://pinned.test:{port}/pinned"})
    assert r.status_code == 200, r.text
    receiver.secrets["/pinned"] = r.json()["secret"]
    job = _job(hooks_client, upload, auth)
    assert hooks_client.post(f"/v1/fine_tuning/jobs/{job}/cancel", headers=auth).status_code == 200
    (got,) = _wait(lambda: receiver.at("/pinned"))
    assert got.payload is not None and got.headers["host"] == f"pinned.test:{port}"


def test_redirects_are_not_followed_and_receiver_bodies_are_not_echoed(
    hooks_client: TestClient, receiver: Receiver, upload, auth
) -> None:
    receiver.scripts["/moved"] = ["redirect"]
    receiver.scripts["/leaky"] = ["leak"]
    moved = _register(hooks_client, auth, receiver, "/moved")
    leaky = _register(hooks_client, auth, receiver, "/leaky")
    job = _job(hooks_client, upload, auth)
    assert hooks_client.post(f"/v1/fine_tuning/jobs/{job}/cancel", headers=auth).status_code == 200

    done = lambda d: d and d[0]["status"] == "failed"  # noqa: E731
    redirected = _wait(lambda: _deliveries(hooks_client, auth, moved["id"]), done)[0]
    assert redirected["response_status_code"] == 302 and redirected["last_error"] == "HTTP 302"
    assert receiver.at("/redirected") == []
    leaked = _wait(lambda: _deliveries(hooks_client, auth, leaky["id"]), done)[0]
    assert leaked["response_status_code"] == 500 and leaked["last_error"] == "HTTP 500"
    everything = hooks_client.get(f"/v1/webhooks/{leaky['id']}/deliveries", headers=auth).text
    assert "hunter2" not in everything and LEAKED_BODY not in everything


def test_a_stored_url_with_crlf_fails_counted_attempts_and_marks_the_endpoint_failing(
    hooks_client: TestClient, receiver: Receiver, upload, auth
) -> None:
    """A URL stored before URLs were checked (or written by hand): every delivery still ends."""
    job = _job(hooks_client, upload, auth)
    sessions = hooks_client.app.state.ctx.sessions  # type: ignore[attr-defined]
    project_id = hooks_client.get(f"/v1/fine_tuning/jobs/{job}", headers=auth).json()["organization_id"]
    endpoint_id = new_id("whep")
    with sessions() as session, session.begin():
        session.add(
            WebhookEndpoint(
                id=endpoint_id,
                project_id=project_id,
                url=f"{receiver.base}/crlf\r\nX-Injected: 1",
                events=None,
                secret=new_secret(),
                status="active",
                consecutive_failures=0,
                created_at=utcnow(),
            )
        )
    assert hooks_client.post(f"/v1/fine_tuning/jobs/{job}/cancel", headers=auth).status_code == 200

    def delivery() -> WebhookDelivery | None:
        with sessions() as session:
            return session.scalar(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id))

    failed = _wait(delivery, lambda d: d is not None and d.status == "failed")
    assert failed.attempts == 3 and failed.last_error.startswith("InvalidURL")
    assert hooks_client.get(f"/v1/webhooks/{endpoint_id}", headers=auth).json()["status"] == "failing"
    assert receiver.received == []
