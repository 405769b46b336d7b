"""The leader's doorbell passes on a real database: ``send_pending`` reads a batch's jobs in one query, the
loop drains a backlog back to back, and the redispatch sweep rings an unclaimed job again only when its
``redispatch_at`` is due, never while a doorbell is pending, and backs off with the job's time in queue."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import event, select

from app.models import Job, JobStatus, OutboxMessage
from app.models.base import as_utc, utcnow
from app.services.dispatch import (
    BATCH,
    REDISPATCH_MAX_FACTOR,
    DispatcherThread,
    next_redispatch,
    redispatch_lost,
    send_pending,
)
from app.settings import Settings
from tests.api.conftest import RecordingDoorbell


def _create_jobs(client, upload, auth, n: int) -> list[str]:
    file_id = upload().json()["id"]
    body = {"model": "tiny-mistral", "training_file": file_id}
    ids = []
    for _ in range(n):
        r = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    return ids


def test_send_pending_costs_the_same_statements_for_2_rows_as_for_5(client, upload, auth) -> None:
    ctx = client.app.state.ctx
    counts = []
    _send_all(ctx)  # doorbells other tests left in this session's database
    for n in (2, 5):  # 7 jobs: under the default IPO_MAX_ACTIVE_JOBS (8)
        _create_jobs(client, upload, auth, n)
        seen: list[str] = []

        def count(_conn: Any, _cursor: Any, statement: str, *_: Any, seen: list[str] = seen) -> None:
            seen.append(statement)

        event.listen(ctx.engine, "before_cursor_execute", count)
        try:
            with ctx.sessions() as session, session.begin():
                assert send_pending(session, RecordingDoorbell(), ctx.settings) == n
        finally:
            event.remove(ctx.engine, "before_cursor_execute", count)
        counts.append(len(seen))
    assert counts[0] == counts[1], counts  # one SELECT of the jobs, not one per row


def _send_all(ctx: Any) -> None:
    while True:
        with ctx.sessions() as session, session.begin():
            if send_pending(session, RecordingDoorbell(), ctx.settings) == 0:
                return


def _pending(ctx: Any, job_id: str) -> int:
    """Unsent doorbells of ``job_id`` (the database is shared with the other tests of the session)."""
    with ctx.sessions() as session:
        rows = session.scalars(select(OutboxMessage.payload).where(OutboxMessage.sent_at.is_(None)))
        return sum(1 for p in rows if p["job_id"] == job_id)


def _sweep(ctx: Any) -> None:
    with ctx.sessions() as session, session.begin():
        redispatch_lost(session, batch=10_000)


def test_an_unclaimed_job_is_rung_again_when_due_and_never_doubled(client, upload, auth) -> None:
    ctx = client.app.state.ctx
    (job_id,) = _create_jobs(client, upload, auth, 1)
    _sweep(ctx)
    assert _pending(ctx, job_id) == 1  # its first doorbell is still in the outbox: not doubled
    _send_all(ctx)
    assert _pending(ctx, job_id) == 0
    with ctx.sessions() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None and job.redispatch_at is not None and job.dispatched_at is not None
        assert as_utc(job.redispatch_at) - as_utc(job.dispatched_at) >= timedelta(
            seconds=ctx.settings.redispatch_after_seconds
        )
    _sweep(ctx)
    assert _pending(ctx, job_id) == 0  # not due yet
    with ctx.sessions() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        job.redispatch_at = utcnow() - timedelta(seconds=1)  # the message was lost: time is up
    _sweep(ctx)
    assert _pending(ctx, job_id) == 1
    _sweep(ctx)
    assert _pending(ctx, job_id) == 1  # the new doorbell is pending: not doubled
    _send_all(ctx)

    # A claimed job is never rung again, whatever its redispatch_at says.
    with ctx.sessions() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        job.redispatch_at = utcnow() - timedelta(seconds=1)
        job.lease_token = "held"
    _sweep(ctx)
    assert _pending(ctx, job_id) == 0


def test_the_wait_between_doorbells_grows_with_the_time_in_queue_up_to_a_cap() -> None:
    settings = Settings(redispatch_after_seconds=60)
    now = utcnow()
    job = Job(queued_at=now)
    assert next_redispatch(settings, job, now) == now + timedelta(seconds=60)
    job.queued_at = now - timedelta(seconds=200)  # waited 200 s: next ring in 200 s, so rings double apart
    assert next_redispatch(settings, job, now) == now + timedelta(seconds=200)
    job.queued_at = now - timedelta(days=1)
    assert next_redispatch(settings, job, now) == now + timedelta(seconds=60 * REDISPATCH_MAX_FACTOR)
    job.queued_at = None
    assert next_redispatch(settings, job, now) == now + timedelta(seconds=60)


def test_the_dispatcher_thread_drains_a_backlog_without_waiting_for_its_interval(client, upload, auth) -> None:
    """2.5 batches of doorbells with a one-hour interval: the thread sends them all back to back."""
    ctx = client.app.state.ctx
    (job_id,) = _create_jobs(client, upload, auth, 1)
    with ctx.sessions() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        session.add_all(
            OutboxMessage(
                project_id=job.project_id, kind="dispatch_job", payload={"job_id": job_id}, created_at=utcnow()
            )
            for _ in range(BATCH * 5 // 2)
        )
    bell = RecordingDoorbell()
    settings = ctx.settings.model_copy(update={"dispatch_interval_seconds": 3600.0})
    thread = DispatcherThread(ctx.sessions, settings, bell, threading.Event())
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while _pending(ctx, job_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _pending(ctx, job_id) == 0, "the backlog waited for the next interval"
    finally:
        thread.stop()
    assert bell.rung.count(job_id) >= BATCH * 5 // 2 + 1


class _Leadership:
    """A leader lock that is lost until ``regain`` is set (the database restarting, a take-over)."""

    def __init__(self) -> None:
        self.regain = threading.Event()
        self.since: float | None = None

    def held(self) -> bool:
        if self.regain.is_set() and self.since is None:
            self.since = time.monotonic()
        return self.regain.is_set()


def test_a_new_leader_holds_the_reaper_off_for_one_lease_period(client, upload, auth) -> None:
    """A lease that ran out while no process led (the database restarting: heartbeats could not be
    recorded, the leader lock was lost with its connection) is not reaped the moment the lock is back: a
    live worker gets one lease period to heartbeat again. The CI run that found it reaped a live worker's
    job after a Postgres restart (attempt 2)."""
    ctx = client.app.state.ctx
    (job_id,) = _create_jobs(client, upload, auth, 1)
    lease = 2.0
    with ctx.sessions() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        job.status, job.attempt, job.worker_id = JobStatus.RUNNING, 1, "worker-0"
        job.lease_token, job.lease_expires_at = "token", utcnow() - timedelta(seconds=30)
    settings = ctx.settings.model_copy(update={"dispatch_interval_seconds": 0.05, "lease_seconds": lease})
    leader = _Leadership()
    thread = DispatcherThread(ctx.sessions, settings, RecordingDoorbell(), threading.Event(), leader)  # type: ignore[arg-type]
    thread.start()
    try:
        time.sleep(lease + 0.5)  # longer than the hold-off at start: it must count from becoming leader
        leader.regain.set()
        time.sleep(lease / 2)
        assert _lease_token(ctx, job_id) == "token", "reaped at once on becoming leader"
        deadline = time.monotonic() + 30
        while _lease_token(ctx, job_id) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        reaped_after = time.monotonic() - (leader.since or 0.0)
    finally:
        thread.stop()
    assert _lease_token(ctx, job_id) is None, "a lease expired long ago was never reaped"
    assert reaped_after >= lease - 0.1, reaped_after


def _lease_token(ctx: Any, job_id: str) -> str | None:
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.lease_token
