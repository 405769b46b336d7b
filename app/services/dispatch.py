"""The dispatcher loop: sends outbox rows to Celery after commit, re-sends lost doorbells, reaps leases,
and purges expired ``Idempotency-Key`` records.

Postgres is the ledger and Celery only the doorbell: a message that never arrives (broker flushed,
API crashed between commit and send) delays a job, it never loses it. Several API replicas can run
this loop at once: rows are taken with ``FOR UPDATE SKIP LOCKED``, and a doorbell rung twice is
harmless because the worker's claim is a conditional UPDATE.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.models import Job, JobStatus, OutboxMessage
from app.models.base import as_utc, utcnow
from app.services import idempotency
from app.services.jobs import add_event, enqueue_dispatch
from app.services.leader import Leadership
from app.services.worker_protocol import fail_attempt, release
from app.settings import Settings
from contracts.internal import TASK_NAME, queue_for

log = logging.getLogger(__name__)


class Doorbell(Protocol):
    def ring(self, job_id: str, n_gpus: int = 1) -> None:
        """Tell a worker with at least ``n_gpus`` devices that ``job_id`` may be claimed."""
        ...


class CeleryDoorbell:
    """Sends ``ipo.run_job`` by name: the API never imports the worker's code."""

    def __init__(self, settings: Settings) -> None:
        from celery import Celery

        self.queue = settings.queue
        self.celery = Celery("ipo-api", broker=settings.resolved_broker_url, set_as_current=False)
        self.celery.conf.update(
            broker_transport_options=settings.broker_transport_options(),
            task_serializer="json",
            accept_content=["json"],
            broker_connection_retry_on_startup=True,
        )

    def ring(self, job_id: str, n_gpus: int = 1) -> None:
        """Send the doorbell to ``queue_for(IPO_QUEUE, n_gpus)``: the queue of workers with that many devices."""
        self.celery.send_task(
            TASK_NAME,
            kwargs={"job_id": job_id},
            queue=queue_for(self.queue, n_gpus),
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )


BATCH = 100
"""Rows each step of a tick takes in one transaction (outbox rows sent, jobs re-rung, leases reaped). A tick
that fills a batch is followed by the next at once, not after ``IPO_DISPATCH_INTERVAL_SECONDS``."""

REDISPATCH_MAX_FACTOR = 10
"""The wait between doorbells of one unclaimed job grows with its time in queue up to this many times
``IPO_REDISPATCH_AFTER_SECONDS`` (10 min at the default 60 s): a lost message is still recovered within
that, while a job queued all day behind busy workers gets about 150 doorbells, not 1,440."""


def next_redispatch(settings: Settings, job: Job, now: datetime) -> datetime:
    """When to ring ``job`` again if nobody claims it after a doorbell sent at ``now``: after
    ``redispatch_after_seconds``, or after as long as it has already waited in the queue if that is longer
    (so the rings of a long wait double in spacing), capped at ``REDISPATCH_MAX_FACTOR`` times that."""
    base = float(settings.redispatch_after_seconds)
    waited = (now - as_utc(job.queued_at)).total_seconds() if job.queued_at is not None else 0.0
    return now + timedelta(seconds=min(max(base, waited), base * REDISPATCH_MAX_FACTOR))


def send_pending(session: Session, doorbell: Doorbell, settings: Settings, batch: int = BATCH) -> int:
    """Ring the doorbell of up to ``batch`` unsent outbox rows, oldest first; returns how many were sent.

    Rows are claimed ``FOR UPDATE SKIP LOCKED`` (another replica's pass takes the next ones) and their jobs
    read in one query. A broker error keeps the row (and the rest) for the next tick."""
    rows = list(
        session.scalars(
            select(OutboxMessage)
            .where(OutboxMessage.sent_at.is_(None))
            .order_by(OutboxMessage.id)
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
    )
    if not rows:
        return 0
    ids = {str(row.payload["job_id"]) for row in rows}
    jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}
    sent = 0
    for row in rows:
        row.attempts += 1
        job = jobs.get(str(row.payload["job_id"]))
        try:
            doorbell.ring(str(row.payload["job_id"]), n_gpus=(job.n_gpus or 1) if job is not None else 1)
        except Exception as exc:  # broker down: keep the row, try again next tick
            row.last_error = f"{type(exc).__name__}: {exc}"[:1000]
            log.warning("dispatch of %s failed: %s", row.payload, row.last_error)
            break
        now = utcnow()
        row.sent_at = now
        if job is not None:
            job.dispatched_at = now
            job.redispatch_at = next_redispatch(settings, job, now)
        sent += 1
    return sent


def redispatch_lost(session: Session, batch: int = BATCH) -> int:
    """Queued, unclaimed jobs whose ``redispatch_at`` has passed get a new doorbell (through the outbox):
    the last message may have been lost (broker flushed or restarted without persistence). One indexed
    range query; a job with a doorbell still pending has no ``redispatch_at``, so it is never doubled."""
    jobs = list(
        session.scalars(
            select(Job)
            .where(Job.status == JobStatus.QUEUED, Job.redispatch_at < utcnow(), Job.lease_token.is_(None))
            .order_by(Job.redispatch_at)
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
    )
    for job in jobs:
        enqueue_dispatch(session, job)
    return len(jobs)


def reap_expired_leases(session: Session, settings: Settings) -> int:
    """A worker that stopped heartbeating lost its job: a new attempt resumes from the last checkpoint."""
    now = utcnow()
    jobs = list(
        session.scalars(
            select(Job)
            .where(Job.lease_token.is_not(None), Job.lease_expires_at < now)
            .limit(BATCH)
            .with_for_update(skip_locked=True)
        )
    )
    for job in jobs:
        if job.status == JobStatus.RUNNING:
            fail_attempt(
                session,
                settings,
                job,
                "worker_lost",
                f"worker {job.worker_id} stopped heartbeating (lease expired)",
                retryable=True,
            )
        else:  # paused/cancelled while its worker died: just free it
            release(job)
            add_event(session, job, f"Worker {job.worker_id} lost while stopping; lease released", level="warn")
    return len(jobs)


PURGE_EVERY_SECONDS = 600.0
"""How often the leader deletes ``Idempotency-Key`` records past their 24 h retention (a full scan of
that table, so not every tick)."""


def tick(
    sessions: sessionmaker[Session],
    settings: Settings,
    doorbell: Doorbell,
    *,
    reap: bool = True,
    purge: bool = False,
) -> dict[str, Any]:
    """One pass of the leader's loop, each step in its own transaction.

    Returns counts by step: ``reaped`` (leases expired), ``redispatched``, ``sent`` (outbox rows rung),
    and ``idempotency_purged`` (expired ``Idempotency-Key`` records deleted; 0 unless ``purge``).
    """
    stats: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[Session], int]]] = [
        ("reaped", lambda s: reap_expired_leases(s, settings) if reap else 0),
        ("redispatched", lambda s: redispatch_lost(s)),
        ("sent", lambda s: send_pending(s, doorbell, settings)),
        ("idempotency_purged", lambda s: idempotency.purge_expired(s) if purge else 0),
    ]
    for name, step in steps:
        with sessions() as session, session.begin():
            stats[name] = step(session)
    return stats


class DispatcherThread(threading.Thread):
    """Runs :func:`tick` every ``dispatch_interval_seconds``, at once when a commit wrote an outbox row (the
    ``wake`` event), and back to back while a step fills its ``BATCH`` (a backlog drains at the speed of
    the broker, not at 100 rows per interval).

    The reaper holds off for one lease period whenever this process becomes the leader (at start, after a
    take-over, after the leader lock came back with the database) and after any tick that failed
    (database down): a lease that ran out while heartbeats could not be recorded (API restarting,
    database restarting) says nothing about the worker, and a live one renews it within one heartbeat.
    A worker that really died is reaped one lease period later than otherwise.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        doorbell: Doorbell,
        wake: threading.Event,
        leader: Leadership | None = None,
    ) -> None:
        super().__init__(name="ipo-dispatcher", daemon=True)
        self.sessions, self.settings, self.doorbell, self.wake = sessions, settings, doorbell, wake
        self.leader = leader
        self.stopping = threading.Event()

    def run(self) -> None:
        reap_after = 0.0
        leading = False
        purge_after = 0.0  # the first tick as leader purges; then every PURGE_EVERY_SECONDS
        while not self.stopping.is_set():
            try:
                if self.leader is not None and not self.leader.held():  # followers only wait (app.services.leader)
                    leading = False
                else:
                    now = time.monotonic()
                    if not leading:  # leases may have run out while no one could record heartbeats
                        leading, reap_after = True, max(reap_after, now + self.settings.lease_seconds)
                    purge = now >= purge_after
                    stats = tick(self.sessions, self.settings, self.doorbell, reap=now >= reap_after, purge=purge)
                    if purge:
                        purge_after = now + PURGE_EVERY_SECONDS
                    if any(stats[step] >= BATCH for step in ("reaped", "redispatched", "sent")):
                        continue  # a full batch: more are waiting
            except Exception as exc:  # database or broker down: log, keep looping, recover by itself
                log.warning("dispatcher tick failed: %s: %s", type(exc).__name__, exc)
                reap_after = time.monotonic() + self.settings.lease_seconds
            self.wake.wait(self.settings.dispatch_interval_seconds)
            self.wake.clear()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.join(timeout=10)
