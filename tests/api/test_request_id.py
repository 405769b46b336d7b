"""Request ids and the access log through the real app: echoed or generated ``X-Request-ID``, bound for
every line logged while the request runs (error handlers included), one access line per request."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.api.conftest import RecordingDoorbell

Lines = Callable[[], list[dict[str, Any]]]


def _access(log_lines: Lines, request_id: str) -> dict[str, Any]:
    (line,) = [e for e in log_lines() if e["logger"] == "ipo.access" and e.get("request_id") == request_id]
    return line


def test_incoming_request_id_is_echoed_and_logged(client: TestClient, log_lines: Lines) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "client-req.42_A-b"})
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "client-req.42_A-b"
    access = _access(log_lines, "client-req.42_A-b")
    assert (access["method"], access["path"], access["status"]) == ("GET", "/healthz", 200)
    assert isinstance(access["duration_ms"], float) and access["duration_ms"] >= 0
    assert access["message"].startswith("GET /healthz 200 ")


def test_missing_or_insane_request_id_is_replaced(client: TestClient, log_lines: Lines) -> None:
    ids = set()
    for incoming in (None, "x" * 129, "has space", "new\\nline", 'quote"d', "", "ünïcode".encode()):
        headers: dict[str, Any] = {} if incoming is None else {"X-Request-ID": incoming}
        r = client.get("/healthz", headers=headers)
        returned = r.headers["X-Request-ID"]
        assert returned != incoming and len(returned) == 32 and int(returned, 16) >= 0
        ids.add(returned)
        assert _access(log_lines, returned)["status"] == 200
    assert len(ids) == 7  # a fresh id each time
    assert client.get("/healthz", headers={"X-Request-ID": "y" * 128}).headers["X-Request-ID"] == "y" * 128


def test_domain_errors_and_413s_carry_the_id(client: TestClient, auth: dict[str, str], log_lines: Lines) -> None:
    r = client.get("/v1/fine_tuning/jobs/ftjob-missing", headers={**auth, "X-Request-ID": "req-404"})
    assert r.status_code == 404 and r.headers["X-Request-ID"] == "req-404"
    assert _access(log_lines, "req-404")["status"] == 404
    r = client.post(
        "/v1/fine_tuning/jobs", headers={**auth, "X-Request-ID": "req-413"}, content=b"{" + b" " * (2 << 20) + b"}"
    )
    assert r.status_code == 413 and r.headers["X-Request-ID"] == "req-413"
    assert _access(log_lines, "req-413")["status"] == 413


def test_unhandled_error_line_and_500_carry_the_request_id(settings: Settings, log_lines: Lines) -> None:
    app = create_app(settings, doorbell=RecordingDoorbell())

    @app.get("/boom")
    def boom() -> None:
        logging.getLogger("tests.boom").info("about to fail")
        raise RuntimeError("kaboom")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom", headers={"X-Request-ID": "req-boom"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert r.headers["X-Request-ID"] == "req-boom"
    mine = [e for e in log_lines() if e.get("request_id") == "req-boom"]
    by_logger = {e["logger"]: e for e in mine}
    assert by_logger["tests.boom"]["message"] == "about to fail"
    assert "RuntimeError: kaboom" in by_logger["app.errors"]["exc"]
    assert by_logger["ipo.access"]["status"] == 500


def test_sse_stream_passes_through_with_the_id(
    client: TestClient, upload: Callable[[], Any], auth: dict[str, str], log_lines: Lines
) -> None:
    file_id = upload().json()["id"]
    body = {"model": "tiny-mistral", "training_file": file_id, "method": {"type": "ipo"}}
    job_id = client.post("/v1/fine_tuning/jobs", headers=auth, json=body).json()["id"]
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth).status_code == 200  # terminal
    headers = {**auth, "Accept": "text/event-stream", "X-Request-ID": "req-sse"}
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["X-Request-ID"] == "req-sse"
        text = "".join(r.iter_text())
    assert text.startswith("retry: 2000") and "event: fine_tuning.job.event" in text
    assert text.rstrip().endswith("data: [DONE]")
    assert _access(log_lines, "req-sse")["status"] == 200
