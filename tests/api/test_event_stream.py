"""The SSE stream's shared feed: one poll per job however many clients watch, wake-after-commit delivery,
``Last-Event-ID`` replay across the feed's start, and a job's event ids committing in id order.

The streams are the real ``sse_events`` generators over a real database (``build_context``); the only
instrument is a counter wrapped around the real poll.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select, text

from app.main import build_context
from app.models import Job, JobEvent
from app.routes.events_stream import sse_events
from app.services import event_feed
from app.services.jobs import add_event, cancel_job
from app.state import AppContext


@pytest.fixture
def job(client, upload, auth) -> tuple[str, str]:
    file_id = upload().json()["id"]
    body = {"model": "tiny-mistral", "training_file": file_id}
    job = client.post("/v1/fine_tuning/jobs", headers=auth, json=body).json()
    return job["id"], job["organization_id"]


def _ctx(settings, poll_seconds: float = 0.05) -> tuple[AppContext, list[int]]:
    ctx = build_context(settings)
    calls: list[int] = []
    real = ctx.event_poll

    def counted(job_id: str, since: int | None):
        calls.append(1)
        return real(job_id, since)

    ctx.event_hub = event_feed.EventHub(counted, poll_seconds=poll_seconds)
    return ctx, calls


def _emit(ctx: AppContext, job_id: str, message: str, *, wake: bool = True) -> int:
    with ctx.sessions() as session, session.begin():
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        event = add_event(session, job, message)
        session.flush()
        event_id = event.id
    if wake:
        ctx.event_hub.wake([job_id])
    return event_id


def _end(ctx: AppContext, job_id: str, project_id: str) -> None:
    with ctx.sessions() as session, session.begin():
        cancel_job(session, project_id, job_id)


async def _collect(stream: AsyncIterator[str], until: str | None = None) -> list[tuple[int, str]]:
    """(event id, message) of each event frame until the stream ends (or ``until`` arrives)."""
    got = []
    async for frame in stream:
        if m := re.match(r"id: ftevent-(\d+)\nevent: [^\n]+\ndata: (.*)\n\n", frame):
            got.append((int(m.group(1)), json.loads(m.group(2))["message"]))
            if until is not None and got[-1][1] == until:
                return got
    return got


def test_many_streams_share_one_poll_and_all_get_every_event(settings, job) -> None:
    job_id, project_id = job
    ctx, calls = _ctx(settings, poll_seconds=0.2)

    async def main() -> list[list[tuple[int, str]]]:
        streams = [asyncio.create_task(_collect(sse_events(ctx, job_id, None))) for _ in range(50)]
        await asyncio.sleep(0.3)
        for i in range(5):
            await asyncio.to_thread(_emit, ctx, job_id, f"step {i}")
            await asyncio.sleep(0.05)
        await asyncio.to_thread(_end, ctx, job_id, project_id)
        ctx.event_hub.wake([job_id])
        return await asyncio.wait_for(asyncio.gather(*streams), 20)

    started = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - started
    messages = [m for _, m in results[0]]
    assert [m for m in messages if m.startswith("step")] == [f"step {i}" for i in range(5)]
    assert messages[-1].startswith("Job cancelled") or "cancel" in messages[-1].lower()
    assert all(r == results[0] for r in results), "every stream sees the same events in the same order"
    # One feed: polls follow the clock and the wakes, not the number of streams (50 streams polling
    # on their own would have made at least 50 calls).
    assert len(calls) <= elapsed / 0.2 + 12, (len(calls), elapsed)


def test_a_commit_wakes_the_feed_without_waiting_for_a_poll(settings, job) -> None:
    job_id, _ = job
    ctx, _ = _ctx(settings, poll_seconds=60)  # only a wake can deliver within the test

    async def main() -> float:
        stream = sse_events(ctx, job_id, None)
        task = asyncio.create_task(_collect(stream, until="wake me"))
        await asyncio.sleep(0.3)
        sent = time.monotonic()
        await asyncio.to_thread(_emit, ctx, job_id, "wake me")
        await asyncio.wait_for(task, 10)
        await stream.aclose()
        return time.monotonic() - sent

    assert asyncio.run(main()) < 5


def test_a_late_subscriber_replays_from_its_last_event_id(settings, job) -> None:
    job_id, project_id = job
    ctx, _ = _ctx(settings)
    first = _emit(ctx, job_id, "a", wake=False)
    _emit(ctx, job_id, "b", wake=False)

    async def main() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        # The feed starts at "b" (its first subscriber has seen everything so far) ...
        with ctx.sessions() as session:
            newest = max(session.scalars(select(JobEvent.id).where(JobEvent.job_id == job_id)))
        early = asyncio.create_task(_collect(sse_events(ctx, job_id, newest)))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(_emit, ctx, job_id, "c")
        # ... and a client reconnecting with Last-Event-ID = "a" gets b and c once each, in order.
        late = asyncio.create_task(_collect(sse_events(ctx, job_id, first)))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(_emit, ctx, job_id, "d")
        await asyncio.to_thread(_end, ctx, job_id, project_id)
        return await asyncio.wait_for(asyncio.gather(early, late), 20)

    early, late = asyncio.run(main())
    assert [m for _, m in early][:2] == ["c", "d"]
    assert [m for _, m in late][:3] == ["b", "c", "d"]
    assert len({i for i, _ in late}) == len(late)


def _lock_waiters(ctx: AppContext) -> int:
    """Backends of this database waiting for a lock now (pg_stat_activity)."""
    with ctx.sessions() as session:
        return int(
            session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            )
            or 0
        )


def test_a_jobs_event_ids_commit_in_order_so_a_resume_misses_nothing(settings, job) -> None:
    """A writer that takes an event id while another transaction holds an earlier one waits for it, so a
    client that saw id N (a stream, ``Last-Event-ID``, the list's ``after``) never later finds a lower id."""
    if not settings.resolved_database_url.startswith("postgresql"):
        pytest.skip("SQLite serialises writers: ids cannot commit out of order")
    job_id, project_id = job
    ctx, _ = _ctx(settings)

    slow = ctx.sessions()
    slow.begin()
    row = slow.get(Job, job_id)
    assert row is not None
    slow_event = add_event(slow, row, "slow")
    slow.flush()  # takes an id, not yet committed
    fast = ThreadPoolExecutor(1).submit(_emit, ctx, job_id, "fast", wake=False)
    while not fast.done() and _lock_waiters(ctx) == 0:
        time.sleep(0.02)
    assert not fast.done(), "the second writer took an id and committed while a lower id was in flight"
    slow.commit()
    slow.close()
    fast_id = fast.result(timeout=30)
    assert fast_id > slow_event.id

    async def main() -> list[tuple[int, str]]:
        task = asyncio.create_task(_collect(sse_events(ctx, job_id, slow_event.id - 1)))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(_end, ctx, job_id, project_id)
        return await asyncio.wait_for(task, 20)

    messages = [m for _, m in asyncio.run(main())]
    assert messages[:2] == ["slow", "fast"]
