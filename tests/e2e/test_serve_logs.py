"""``ipo serve`` with stderr going to a file (not a terminal): every line it writes there is one JSON
object, uvicorn's included; requests get one access line each, with the request id; SSE still streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from app.auth import create_key
from app.db import make_engine, make_sessionmaker
from app.migrate import upgrade
from ipo_cli.processes import free_port, stop_group, wait_http_ok
from tests.api.conftest import pref_line


def test_serve_writes_json_lines_with_request_ids(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as session, session.begin():
        _, key = create_key(session, f"logs-{tmp_path.name}")
    engine.dispose()
    models = tmp_path / "models" / "tiny-mistral"
    models.mkdir(parents=True)
    (models / "config.json").write_text('{"model_type": "mistral"}')
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("IPO_LOG_FORMAT", "IPO_LOG_LEVEL")}
    env |= {
        "IPO_DATABASE_URL": database_url,
        "IPO_VAR_DIR": str(tmp_path / "var"),
        "IPO_MODELS_DIR": str(tmp_path / "models"),
        "IPO_RUN_DISPATCHER": "false",  # the session's database holds other tests' queued jobs
        "IPO_RUN_WEBHOOK_SENDER": "false",
        "PYTHONUNBUFFERED": "1",
    }
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr, (tmp_path / "stdout.log").open("wb") as stdout:
        api = subprocess.Popen(
            [sys.executable, "-m", "ipo_cli.main", "serve", "--port", str(port)],
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    auth = {"Authorization": f"Bearer {key}"}
    try:
        wait_http_ok(f"{url}/healthz", [api], timeout=30)
        with httpx.Client(base_url=url, timeout=10) as client:
            r = client.get("/healthz", headers={"X-Request-ID": "live-health"})
            assert r.headers["X-Request-ID"] == "live-health"
            assert client.get("/v1/fine_tuning/jobs/ftjob-nope", headers=auth).status_code == 404
            data = "\n".join(pref_line(i) for i in range(8)).encode()
            r = client.post("/v1/files", headers=auth, files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"})
            body = {"model": "tiny-mistral", "training_file": r.json()["id"], "method": {"type": "ipo"}}
            job_id = client.post("/v1/fine_tuning/jobs", headers=auth, json=body).json()["id"]
            # A queued job's stream never ends: its first bytes arriving prove nothing buffers the stream.
            headers = {**auth, "X-Request-ID": "live-sse"}
            with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true", headers=headers) as s:
                assert s.headers["X-Request-ID"] == "live-sse"
                assert next(s.iter_lines()) == "retry: 2000"
    finally:
        stop_group(api)

    raw = stderr_path.read_text().splitlines()
    assert raw, "nothing on stderr"
    lines = []
    for line in raw:
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in lines)
    assert any(e["logger"] == "uvicorn.error" and "startup complete" in e["message"] for e in lines)
    access = [e for e in lines if e["logger"] == "ipo.access"]
    assert not [e for e in lines if e["logger"] == "uvicorn.access"]
    assert all(len(e["request_id"]) > 0 and e["duration_ms"] >= 0 for e in access)
    by_id = {e["request_id"]: e for e in access}
    assert (by_id["live-health"]["path"], by_id["live-health"]["status"]) == ("/healthz", 200)
    assert by_id["live-sse"]["status"] == 200  # logged once the client went away
    assert any(e["path"] == "/v1/fine_tuning/jobs/ftjob-nope" and e["status"] == 404 for e in access)
    assert len({e["request_id"] for e in access}) == len(access)  # one line per request, no duplicates
