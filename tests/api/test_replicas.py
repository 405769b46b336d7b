"""Several API processes on one database and one Redis: the per-key rate limit is shared through Redis,
and exactly one process (the holder of a Postgres advisory lock) runs the dispatcher / reaper / webhook
sender, with a follower taking over when the leader's process dies."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from fastapi.testclient import TestClient

from app.errors import RateLimited
from app.main import create_app
from app.services.leader import Leadership
from app.services.rate_limit import make_rate_limiter
from app.settings import Settings
from tests.api.conftest import RecordingDoorbell

needs_postgres = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL"), reason="leader election is a Postgres advisory lock"
)


@pytest.fixture
def redis(redis_url: str | None) -> str:
    if not redis_url:
        pytest.skip("needs TEST_REDIS_URL")
    return redis_url


def test_rate_limit_is_shared_by_two_app_instances(settings: Settings, redis: str, auth: dict[str, str]) -> None:
    shared = settings.model_copy(update={"redis_url": redis, "rate_limit_per_minute": 3})
    with ExitStack() as stack:
        a = stack.enter_context(TestClient(create_app(shared, doorbell=RecordingDoorbell())))
        b = stack.enter_context(TestClient(create_app(shared, doorbell=RecordingDoorbell())))
        # Three tokens for the key, whichever replica is asked: a, b, a pass; then both refuse.
        assert [c.get("/v1/models", headers=auth).status_code for c in (a, b, a)] == [200, 200, 200]
        for c in (b, a):
            r = c.get("/v1/models", headers=auth)
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert 1 <= int(r.headers["Retry-After"]) <= 20  # one token every 20 s at 3 a minute


def test_redis_limiter_is_per_key_and_the_broker_url_is_used(settings: Settings, redis: str) -> None:
    assert settings.model_copy(update={"broker_url": redis}).resolved_redis_url == redis
    assert settings.model_copy(update={"broker_url": "amqp://x"}).resolved_redis_url is None
    limiter = make_rate_limiter(1, redis)
    key = f"k-{secrets.token_hex(4)}"
    limiter.check(key)
    with pytest.raises(RateLimited):
        make_rate_limiter(1, redis).check(key)  # another process's limiter, same bucket
    limiter.check(f"other-{key}")


def test_unreachable_redis_degrades_to_a_per_process_limit() -> None:
    limiter = make_rate_limiter(2, "redis://127.0.0.1:1/0")  # nothing listens on port 1
    limiter.check("k")
    limiter.check("k")
    with pytest.raises(RateLimited):
        limiter.check("k")


def test_sqlite_is_always_the_leader(tmp_path) -> None:
    assert Leadership(f"sqlite:///{tmp_path / 'x.db'}").held()


_HOLDER = """
import sys, time
from app.services.leader import Leadership
leader = Leadership(sys.argv[1], retry_seconds=0, lock_id=int(sys.argv[2]))
print("leader" if leader.held() else "follower", flush=True)
time.sleep(600)
"""


@needs_postgres
def test_a_follower_takes_over_when_the_leader_process_dies(database_url: str) -> None:
    lock_id = secrets.randbelow(2**31)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, database_url, str(lock_id)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "leader"
        follower = Leadership(database_url, retry_seconds=0, lock_id=lock_id)
        third = Leadership(database_url, retry_seconds=0, lock_id=lock_id)
        assert not follower.held() and not third.held()
        holder.send_signal(signal.SIGKILL)  # no clean shutdown: Postgres ends its session
        holder.wait(timeout=30)
        deadline = time.monotonic() + 60
        while not follower.held():
            assert time.monotonic() < deadline, "the lock of a dead leader was never released"
            time.sleep(0.2)
        assert not third.held()  # exactly one leader
        assert follower.held()  # and it keeps it
        follower.release()
        deadline = time.monotonic() + 60
        while not third.held():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        third.release()
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.fixture
def two_dispatching_apps(settings: Settings) -> Iterator[tuple[RecordingDoorbell, RecordingDoorbell, TestClient]]:
    live = settings.model_copy(update={"run_dispatcher": True, "dispatch_interval_seconds": 0.2})
    bells = (RecordingDoorbell(), RecordingDoorbell())
    with ExitStack() as stack:
        a = stack.enter_context(TestClient(create_app(live, doorbell=bells[0])))
        stack.enter_context(TestClient(create_app(live, doorbell=bells[1])))
        yield bells[0], bells[1], a


@needs_postgres
def test_only_the_leader_dispatches(two_dispatching_apps, upload, auth) -> None:
    bell_a, bell_b, client = two_dispatching_apps
    file_id = upload().json()["id"]
    jobs = []
    for _ in range(3):
        r = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-mistral", "training_file": file_id})
        assert r.status_code == 200, r.text
        jobs.append(r.json()["id"])
    deadline = time.monotonic() + 60
    while not set(jobs) <= set(bell_a.rung + bell_b.rung):
        assert time.monotonic() < deadline, (bell_a.rung, bell_b.rung)
        time.sleep(0.2)
    # One process rang every doorbell; the other, a follower, rang none.
    assert sorted(map(len, (bell_a.rung, bell_b.rung)))[0] == 0, (bell_a.rung, bell_b.rung)
