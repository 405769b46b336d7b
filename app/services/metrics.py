"""Prometheus metrics: process-local histograms and counters, plus gauges read from the ledger at scrape time.

Gauges (jobs by status, queue depth, per-worker tokens/s and GPU memory, pending webhook deliveries, unsent
doorbells) are computed from the database on every scrape, so they are right whatever the number of API
processes or replicas. Histograms and counters live in the process that observed them: with several
uvicorn workers ``prometheus_client`` sums them across processes through ``PROMETHEUS_MULTIPROC_DIR``, which
``ipo serve --workers N`` prepares (``ipo_cli/server.py`` ``prepare_metrics_dir``). Separate replicas are
separate scrape targets: Prometheus scrapes each and ``sum()`` adds them up.

Everything here is aggregate: no job ids, no project ids, no user data (``/metrics`` is unauthenticated).
Observations made on a request's session are recorded only once that session commits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import DeliveryStatus, Job, JobEvent, JobStatus, OutboxMessage, WebhookDelivery
from app.models.base import as_utc

log = logging.getLogger(__name__)

QUEUE_WAIT = Histogram(
    "ipo_job_queue_wait_seconds",
    "Time a job waited queued (since created, resumed or requeued) before a worker claimed it.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
)
JOB_DURATION = Histogram(
    "ipo_job_duration_seconds",
    "Time from job creation to its end (succeeded, failed or cancelled).",
    ["outcome"],
    buckets=(10, 60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 259200),
)
HTTP_DURATION = Histogram(
    "ipo_http_request_duration_seconds",
    "Time to the response status of HTTP requests, by route template (streams: time to first byte).",
    ["method", "route", "status"],
)
WEBHOOK_DELIVERIES = Counter(
    "ipo_webhook_deliveries",
    "Webhook delivery attempts by outcome: succeeded, retrying (failed, will retry), failed (gave up).",
    ["outcome"],
)

_AFTER_COMMIT = "ipo_metrics_after_commit"


def after_commit(session: Session, observe: Callable[[], None]) -> None:
    """Run ``observe`` once ``session`` commits (dropped on rollback): a refused transition counts nothing."""
    session.info.setdefault(_AFTER_COMMIT, []).append(observe)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    for observe in session.info.pop(_AFTER_COMMIT, []):
        try:
            observe()
        except Exception:  # a metric must never break a request
            log.exception("metric observation failed")


@event.listens_for(Session, "after_rollback")
def _drop_after_rollback(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (as_utc(end) - as_utc(start)).total_seconds())


def job_claimed(session: Session, job: Job, claimed_at: datetime) -> None:
    wait = _seconds(job.queued_at or job.created_at, claimed_at)
    if wait is not None:
        after_commit(session, lambda: QUEUE_WAIT.observe(wait))


def job_ended(session: Session, job: Job) -> None:
    duration = _seconds(job.created_at, job.finished_at)
    if duration is not None:
        outcome = str(job.status)
        after_commit(session, lambda: JOB_DURATION.labels(outcome=outcome).observe(duration))


def observe_http(method: str, route: str, status: int, seconds: float) -> None:
    HTTP_DURATION.labels(method=method, route=route, status=str(status)).observe(seconds)


def webhook_attempt(outcome: str) -> None:
    WEBHOOK_DELIVERIES.labels(outcome=outcome).inc()


class LedgerCollector(Collector):
    """Gauges computed from the database when scraped."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        try:
            with self.sessions() as session:
                families = _ledger_families(session)
        except Exception as exc:  # database down: the process metrics still answer
            log.warning("metrics: ledger gauges unavailable: %s", type(exc).__name__)
            families = []
        up = GaugeMetricFamily("ipo_ledger_up", "1 if the ledger gauges could be read from the database.")
        up.add_metric([], 1 if families else 0)
        yield up
        yield from families


def _ledger_families(session: Session) -> list[Metric]:
    counts: dict[str, int] = {s.value: 0 for s in JobStatus}
    for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        counts[str(status)] = int(n)
    jobs = GaugeMetricFamily("ipo_jobs", "Fine-tuning jobs by status (all projects).", labels=["status"])
    for status, n in sorted(counts.items()):
        jobs.add_metric([status], n)
    depth = GaugeMetricFamily("ipo_queue_depth", "Jobs queued, waiting for a worker.")
    depth.add_metric([], counts[JobStatus.QUEUED.value])

    tokens = GaugeMetricFamily(
        "ipo_worker_tokens_per_second",
        "Training throughput each worker last reported for the job it runs.",
        labels=["worker"],
    )
    memory = GaugeMetricFamily(
        "ipo_worker_gpu_memory_bytes", "GPU memory each worker last reported for the job it runs.", labels=["worker"]
    )
    for worker, data in _latest_worker_metrics(session).items():
        if isinstance(v := data.get("tokens_per_second"), int | float):
            tokens.add_metric([worker], float(v))
        if isinstance(v := data.get("gpu_memory_bytes"), int | float):
            memory.add_metric([worker], float(v))

    pending = GaugeMetricFamily("ipo_webhook_deliveries_pending", "Webhook deliveries not yet delivered or given up.")
    pending.add_metric(
        [],
        session.scalar(
            select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.status == DeliveryStatus.PENDING)
        )
        or 0,
    )
    outbox = GaugeMetricFamily(
        "ipo_outbox_pending",
        "Doorbells committed but not yet sent to the broker: the leader's dispatcher lag (near 0 when it keeps up).",
    )
    outbox.add_metric(
        [], session.scalar(select(func.count()).select_from(OutboxMessage).where(OutboxMessage.sent_at.is_(None))) or 0
    )
    return [jobs, depth, tokens, memory, pending, outbox]


def _latest_worker_metrics(session: Session) -> dict[str, dict[str, Any]]:
    """The newest metrics event of each running job, keyed by its worker (a handful of rows: one per GPU)."""
    running = session.execute(
        select(Job.id, Job.worker_id, Job.attempt).where(Job.status == JobStatus.RUNNING, Job.worker_id.is_not(None))
    ).all()
    latest: dict[str, dict[str, Any]] = {}
    for job_id, worker, attempt in running:
        data = session.scalar(
            select(JobEvent.data)
            .where(JobEvent.job_id == job_id, JobEvent.attempt == attempt, JobEvent.type == "metrics")
            .order_by(JobEvent.id.desc())
            .limit(1)
        )
        if isinstance(data, dict):
            latest[str(worker)] = data
    return latest


def process_registry() -> CollectorRegistry:
    """This process's registry, or every process's (``PROMETHEUS_MULTIPROC_DIR``) aggregated."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
        return registry
    return REGISTRY


def render(sessions: sessionmaker[Session]) -> bytes:
    ledger = CollectorRegistry(auto_describe=False)
    ledger.register(LedgerCollector(sessions))
    return generate_latest(process_registry()) + generate_latest(ledger)
