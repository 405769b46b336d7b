"""Fine-tuning jobs, their events and checkpoints: the ledger the worker protocol runs on."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from app.models.base import Base, JsonDoc, utcnow


class JobStatus(enum.StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


ACTIVE_STATUSES = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED)
"""The statuses that are not terminal: counted against ``IPO_MAX_ACTIVE_JOBS`` and cancellable."""


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_project_created", "project_id", "created_at", "id"),
        Index("ix_jobs_project_status_created", "project_id", "status", "created_at", "id"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_status_redispatch", "status", "redispatch_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.QUEUED)
    model: Mapped[str] = mapped_column(String(200))
    training_file: Mapped[str] = mapped_column(ForeignKey("files.id"))
    validation_file: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    job_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JsonDoc)
    base_model: Mapped[str | None] = mapped_column(String(200))
    """The allow-listed base model at the root of the job's lineage (``model`` itself for a job on a base
    model; NULL on rows from before migration 0004, where it is ``model``)."""
    parent_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    """The job whose fine-tuned model (or checkpoint) this job starts from: its adapter is merged into the
    base before a new adapter is trained, and it is the reference model of a preference job."""
    parent_checkpoint_id: Mapped[str | None] = mapped_column(String(40))
    """Set when the starting point is one of the parent's checkpoints rather than its final adapter (no
    foreign key: checkpoints already reference jobs, and the row is checked when the job is created)."""
    from_checkpoint_id: Mapped[str | None] = mapped_column(String(40))
    """Warm start (Together's ``from_checkpoint``): the new adapter starts from this checkpoint's adapter
    weights, on the checkpoint job's own starting model; optimiser and schedule start fresh."""
    method: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    """The validated ``method`` block, as the user sent it (``contracts.method.Method``)."""
    resolved_hyperparameters: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    """What actually ran, every ``auto`` resolved (reported by the worker)."""
    integrations: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonDoc)
    """The validated ``integrations`` blocks (``contracts.integrations``); None or [] for none."""
    n_gpus: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """Devices the job trains on at once (one process each, ``accelerate launch``); routes its doorbell to
    a queue whose workers declare that many (``contracts.internal.queue_for``). 1 on rows from before 0006."""

    attempt: Mapped[int] = mapped_column(Integer, default=0)
    """Number of claims so far; the current attempt while running."""
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker_id: Mapped[str | None] = mapped_column(String(200))
    released_lease_token: Mapped[str | None] = mapped_column(String(64))
    """The token whose attempt just ended: a retried finish/fail/stopped under it is answered, not refused."""

    error: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300), index=True)
    fine_tuned_model_deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Set by ``DELETE /v1/models/{id}``: the model no longer lists or resolves; the job keeps its history."""
    result_files: Mapped[list[str] | None] = mapped_column(JsonDoc)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    step: Mapped[int | None] = mapped_column(Integer)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the job last became ``queued`` (created, resumed, requeued): the start of its queue wait."""
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the last Celery message for this job was sent."""
    redispatch_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When to ring the doorbell again if the job is still unclaimed (a lost message): set when one is sent
    (``app.services.dispatch.next_redispatch``), cleared while one waits in the outbox, so it is non-null
    only for a job with no doorbell pending."""


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (
        # A replayed worker report (same attempt + seq) is dropped, never duplicated.
        UniqueConstraint("job_id", "attempt", "seq"),
        Index("ix_job_events_job_id_id", "job_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    """Assigned by the database from a sequence; one job's ids are also in commit order
    (:func:`lock_jobs_of_new_events`), so a reader that saw id N never later finds a lower id of that job."""
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    attempt: Mapped[int | None] = mapped_column(Integer)
    seq: Mapped[int | None] = mapped_column(Integer)
    """The worker's per-attempt sequence number; NULL for events the API writes itself."""
    type: Mapped[str] = mapped_column(String(20), default="message")
    level: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(String(4000))
    data: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def lock_jobs_of_new_events(session: Session, _flush_context: Any, _instances: Any) -> None:
    """``before_flush`` hook (installed by ``app.db.make_sessionmaker``): on Postgres, lock the row of every
    existing job that gets a new event in this flush (``SELECT ... FOR UPDATE``, in id order), so that a
    job's event ids are handed out in commit order.

    Why: ids come from a sequence at INSERT time, so without this one transaction could take id 10,
    another take 11 and commit first; a client that read 11 and resumes after it (SSE ``Last-Event-ID``,
    the events list's ``after``) would never see 10. Held from the INSERT to the commit, the job's row lock
    makes the next writer of that job's events wait, take a higher id and commit later. Every event writer
    (worker reports, cancel/pause, the reaper) already updates or locks that job row, so this adds no new
    lock order. SQLite needs nothing: one writer at a time, holding its lock until commit.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    created = {o.id for o in session.new if isinstance(o, Job)}  # not visible to anyone else yet
    job_ids = sorted({o.job_id for o in session.new if isinstance(o, JobEvent)} - created)
    if job_ids:
        session.connection().execute(select(Job.id).where(Job.id.in_(job_ids)).order_by(Job.id).with_for_update())


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (
        Index("ix_checkpoints_job_step", "job_id", "step"),
        # A retried upload of the same checkpoint is answered with the first one.
        UniqueConstraint("job_id", "attempt", "step"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    """The checkpoint archive (adapter + optimizer state), recorded only once fully stored."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
