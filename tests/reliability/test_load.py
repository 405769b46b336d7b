"""Load: 1,000 job submissions from 50 concurrent clients against a live ``ipo serve`` (loopback only).

The dispatcher runs but no worker does, so every job stays queued and its doorbell waits in Redis.
900 distinct Idempotency-Keys, 100 of them sent a second time (shuffled in, so some retries race
their original). Exactly the distinct jobs must exist, each with exactly one sent dispatch row and
one message in the queue, and no request may get a 5xx.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from app.models import Job, OutboxMessage
from tests.reliability.conftest import make_stack, wait_for
from tests.reliability.services import ThrowawayPostgres, ThrowawayRedis

pytestmark = [pytest.mark.slow]

TOTAL = 1000
RETRIED = 100
CLIENTS = 50


def test_concurrent_submissions_with_idempotent_retries(
    pg: ThrowawayPostgres, redis_server: ThrowawayRedis, tiny_models_dir: Path, tmp_path: Path
) -> None:
    stack = make_stack(
        pg,
        redis_server,
        tmp_path,
        tiny_models_dir,
        IPO_RATE_LIMIT_PER_MINUTE="0",
        IPO_MAX_ACTIVE_JOBS="0",
        IPO_REDISPATCH_AFTER_SECONDS="3600",
    )
    try:
        stack.start_api()
        body = stack.job_body(max_steps=10)
        keys = [f"load-{i}" for i in range(TOTAL - RETRIED)]
        rng = random.Random(0)
        plan = keys + rng.sample(keys, RETRIED)
        rng.shuffle(plan)

        http = httpx.Client(
            base_url=stack.url,
            headers=stack.http.headers,
            timeout=60,
            limits=httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS),
        )
        latencies: list[float] = []
        statuses: Counter[int] = Counter()

        def submit(key: str) -> tuple[str, str]:
            while True:  # a retry that races its original gets 409 "still in progress": retry, like the SDK
                t0 = time.perf_counter()
                r = http.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": key})
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] += 1
                if r.status_code == 409:
                    time.sleep(0.05)
                    continue
                assert r.status_code == 200, (r.status_code, r.text)
                return key, str(r.json()["id"])

        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(submit, plan))
        elapsed = time.perf_counter() - started
        http.close()

        assert not [s for s in statuses if s >= 500], statuses
        by_key: dict[str, set[str]] = {}
        for key, job_id in results:
            by_key.setdefault(key, set()).add(job_id)
        assert all(len(ids) == 1 for ids in by_key.values()), "a retried key created a second job"
        distinct = {next(iter(ids)) for ids in by_key.values()}
        assert len(distinct) == TOTAL - RETRIED

        with stack.db() as s:
            assert s.scalar(select(func.count()).select_from(Job)) == len(distinct)
            assert set(s.scalars(select(Job.id))) == distinct

        def all_sent() -> bool:
            with stack.db() as s:
                return not s.scalar(
                    select(func.count()).select_from(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
                )

        drained_at = time.perf_counter()
        wait_for("the dispatcher to send every doorbell", all_sent, 120)
        drain = time.perf_counter() - drained_at
        with stack.db() as s:
            rows = list(s.scalars(select(OutboxMessage).where(OutboxMessage.kind == "dispatch_job")))
        per_job = Counter(str(r.payload["job_id"]) for r in rows)
        assert set(per_job) == distinct and set(per_job.values()) == {1}
        assert all(r.sent_at is not None and r.attempts == 1 for r in rows)
        with redis_server.client() as r:
            queued = r.llen(stack.queue)
        assert queued == len(distinct)  # every doorbell sent exactly once, none lost

        lat = sorted(latencies)
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(
            f"\nRELIABILITY load: requests={len(lat)} (planned {TOTAL}, {statuses[409]} x 409 in-progress retried), "
            f"jobs={len(distinct)}, clients={CLIENTS}, seconds={elapsed:.1f}, "
            f"throughput={len(plan) / elapsed:.0f} submissions/s, p50={p50 * 1000:.0f}ms, p99={p99 * 1000:.0f}ms, "
            f"max={lat[-1] * 1000:.0f}ms, statuses={dict(statuses)}, outbox_drain_after_s={drain:.1f}, "
            f"doorbells_in_queue={queued}",
            flush=True,
        )
    finally:
        stack.close()
