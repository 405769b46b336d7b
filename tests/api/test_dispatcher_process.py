"""``ipo dispatcher``: the singleton loops in a process of their own, for API replicas run with
``IPO_RUN_DISPATCHER=false``. A real subprocess on a database of its own sends the doorbell of a job the
API commits while it runs (woken by the commit's NOTIFY on Postgres, not its interval), stops on SIGTERM,
and gives the leader lock up as it goes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import make_engine, make_sessionmaker
from app.main import create_app
from app.migrate import upgrade
from app.models import OutboxMessage
from app.services.leader import Leadership
from app.settings import Settings
from tests.api.conftest import RecordingDoorbell, _key, pref_line
from tests.conftest import fresh_database


@pytest.fixture
def own_settings(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """The API fixture's settings on a fresh database: the dispatcher process sees no other test's rows."""
    with fresh_database(tmp_path, "ipo_dispatcher") as url:
        upgrade(url)
        yield settings.model_copy(update={"database_url": url})


def _sent_at(settings: Settings, job_id: str) -> object:
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_sessionmaker(engine)() as session:
            rows = session.scalars(select(OutboxMessage).where(OutboxMessage.sent_at.is_not(None))).all()
            return next((r.sent_at for r in rows if r.payload["job_id"] == job_id), None)
    finally:
        engine.dispose()


def test_ipo_dispatcher_sends_the_api_s_doorbells_and_stops_on_sigterm(
    own_settings: Settings, tmp_path: Path, redis_url: str | None
) -> None:
    assert not own_settings.run_dispatcher  # the API process below never sends a doorbell itself
    postgres = own_settings.resolved_database_url.startswith("postgresql")
    auth = {"Authorization": f"Bearer {_key(own_settings, 'dispatcher-test')}"}
    queue = f"ipo.jobs.dispatcher-test-{os.getpid()}"
    env = {
        **os.environ,
        "IPO_DATABASE_URL": own_settings.resolved_database_url,
        "IPO_VAR_DIR": str(tmp_path / "dispatcher-var"),
        "IPO_QUEUE": queue,
        "IPO_WORKER_TOKEN": "worker-secret",
        "IPO_LOG_LEVEL": "INFO",
        # On Postgres the API's commit wakes it (LISTEN/NOTIFY): an interval of an hour must not matter.
        "IPO_DISPATCH_INTERVAL_SECONDS": "3600" if postgres else "0.5",
    }
    if redis_url:
        env["IPO_BROKER_URL"] = redis_url
    log = tmp_path / "dispatcher.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ipo_cli.main", "dispatcher"], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        ready = "is now the leader" if postgres else "ipo dispatcher: running"  # SQLite: always the leader
        while ready not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        with TestClient(create_app(own_settings, doorbell=RecordingDoorbell())) as client:
            data = "\n".join(pref_line(i) for i in range(8)).encode()
            file_id = client.post(
                "/v1/files", headers=auth, data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", data)}
            ).json()["id"]
            body = {"model": "tiny-mistral", "training_file": file_id}
            r = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
            assert r.status_code == 200, r.text
            job_id = r.json()["id"]
        deadline = time.monotonic() + 60
        while _sent_at(own_settings, job_id) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _sent_at(own_settings, job_id) is not None, log.read_text()
        if redis_url:
            import redis

            with redis.Redis.from_url(redis_url) as r:
                assert r.llen(queue) >= 1  # the doorbell is on the broker for a worker
                r.delete(queue)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "ipo dispatcher: running" in log.read_text() and "ipo dispatcher: stopped" in log.read_text()
    # The lock went with it: another process leads at once (Postgres; SQLite has one process by design).
    leader = Leadership(own_settings.resolved_database_url)
    try:
        assert leader.held()
    finally:
        leader.release()
