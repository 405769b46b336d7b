"""The API side of the worker protocol (``/internal/v1``): claim, heartbeat, reports, results.

Claim is one conditional UPDATE (``queued -> running``) that hands out a fresh lease token; every
later write names that token, so a worker that lost its lease (fenced off) gets a 409 and changes
nothing. Event ids come from the database and (attempt, seq) is unique, so replays never duplicate.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any, BinaryIO

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.models import Checkpoint, Job, JobEvent, JobStatus, StoredFile
from app.models.base import new_id, utcnow
from app.services import files as files_service
from app.services import metrics, webhooks
from app.services.jobs import add_event, enqueue_dispatch
from app.services.lineage import parent_chain, warm_start_adapter
from app.settings import Settings
from app.storage import Storage
from contracts.integrations import parse_integrations
from contracts.internal import (
    Action,
    ClaimResponse,
    ControlResponse,
    EventsRequest,
    EventsResponse,
    FailRequest,
    FinishRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    JobSpec,
    ResumeFrom,
    StoppedRequest,
)
from contracts.method import Method

# While a job is cancelled or paused, the worker still owns it until it reports `stopped`.
_LEASED = (JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.CANCELLED)


def _job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"No such job: {job_id}")
    return job


def _fenced(session: Session, job_id: str, token: str, statuses: tuple[JobStatus, ...] = _LEASED) -> Job:
    """The job, locked, if ``token`` still holds its lease; else 409 (this worker was fenced off)."""
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None:
        raise NotFound(f"No such job: {job_id}")
    if job.lease_token is None or not secrets.compare_digest(job.lease_token, token):
        raise Conflict(f"Lease on {job_id} is not held by this worker.", code="lease_lost")
    if job.status not in statuses:
        raise Conflict(f"Job {job_id} is {job.status}.", code="invalid_state")
    return job


def claim(session: Session, settings: Settings, job_id: str, worker_id: str) -> ClaimResponse:
    token = secrets.token_hex(16)
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.lease_token.is_(None))
        .values(
            status=JobStatus.RUNNING.value,
            attempt=Job.attempt + 1,
            lease_token=token,
            lease_expires_at=now + timedelta(seconds=settings.lease_seconds),
            worker_id=worker_id,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        _job(session, job_id)
        raise Conflict(f"Job {job_id} is not waiting to be claimed.", code="not_claimable")
    job = _job(session, job_id)
    session.refresh(job)
    if job.started_at is None:
        job.started_at = now
    metrics.job_claimed(session, job, now)
    latest = session.scalar(
        select(Checkpoint)
        .where(Checkpoint.job_id == job.id)
        .order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())
        .limit(1)
    )
    resume = None
    if latest is not None:
        resume = ResumeFrom(
            checkpoint_id=latest.id, step=latest.step, download_path=f"/internal/v1/files/{latest.file_id}/content"
        )
    msg = f"Attempt {job.attempt} started on worker {worker_id}"
    add_event(session, job, msg + (f", resuming from step {latest.step}" if latest else ""))
    return ClaimResponse(
        job_id=job.id,
        attempt=job.attempt,
        lease_token=token,
        lease_seconds=settings.lease_seconds,
        heartbeat_seconds=settings.heartbeat_seconds,
        spec=JobSpec(
            job_id=job.id,
            model=job.base_model or job.model,
            parents=parent_chain(
                session,
                session.get(Job, job.parent_job_id) if job.parent_job_id else None,
                session.get(Checkpoint, job.parent_checkpoint_id) if job.parent_checkpoint_id else None,
            ),
            warm_start=warm_start_adapter(session, job.from_checkpoint_id),
            training_file=job.training_file,
            validation_file=job.validation_file,
            suffix=job.suffix,
            seed=job.seed,
            method=Method.model_validate(job.method),
            integrations=parse_integrations(job.integrations),
            n_gpus=job.n_gpus or 1,
        ),
        resume_from=resume,
    )


def heartbeat(session: Session, settings: Settings, job_id: str, body: HeartbeatRequest) -> HeartbeatResponse:
    job = _fenced(session, job_id, body.lease_token)
    job.lease_expires_at = utcnow() + timedelta(seconds=settings.lease_seconds)
    if body.progress:
        for field in ("step", "total_steps", "trained_tokens", "estimated_finish"):
            value = getattr(body.progress, field)
            if value is not None:
                setattr(job, field, value)
    if body.resolved_hyperparameters is not None:
        job.resolved_hyperparameters = body.resolved_hyperparameters
    return HeartbeatResponse(action=requested_action(job), status=job.status, lease_seconds=settings.lease_seconds)


def requested_action(job: Job) -> Action:
    """What the worker running ``job`` must do: ``cancel``/``pause`` once the user asked, else ``continue``."""
    status = JobStatus(job.status)
    if status == JobStatus.CANCELLED:
        return "cancel"
    if status == JobStatus.PAUSED:
        return "pause"
    return "continue"


def control(session: Session, job_id: str) -> ControlResponse:
    """The job's requested action and status now (one read; ``GET .../control`` repeats it to long-poll)."""
    job = _job(session, job_id)
    return ControlResponse(action=requested_action(job), status=job.status)


def report_events(session: Session, job_id: str, body: EventsRequest) -> EventsResponse:
    job = _fenced(session, job_id, body.lease_token, (JobStatus.RUNNING, JobStatus.PAUSED))
    seqs = [e.seq for e in body.events]
    known = (
        set(
            session.scalars(
                select(JobEvent.seq).where(
                    JobEvent.job_id == job.id, JobEvent.attempt == job.attempt, JobEvent.seq.in_(seqs)
                )
            )
        )
        if seqs
        else set()
    )
    accepted = 0
    for e in sorted(body.events, key=lambda e: e.seq):
        if e.seq in known:
            continue
        known.add(e.seq)
        add_event(session, job, e.message, level=e.level, type_=e.type, data=e.data, attempt=job.attempt, seq=e.seq)
        accepted += 1
        if e.type == "metrics" and e.data:
            step, total = e.data.get("step"), e.data.get("total_steps")
            if isinstance(step, int):
                job.step = step
            if isinstance(total, int):
                job.total_steps = total
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent replay of the same batch won the race
        raise Conflict("Duplicate report batch; retry.", code="duplicate_report") from exc
    return EventsResponse(accepted=accepted, duplicates=len(body.events) - accepted)


def store_result_file(
    session: Session,
    storage: Storage,
    job: Job,
    stream: BinaryIO,
    filename: str,
) -> StoredFile:
    return files_service.store_file(
        session,
        storage,
        project_id=job.project_id,
        stream=stream,
        filename=filename,
        purpose=files_service.RESULT_PURPOSE,
        max_bytes=None,
        validate=False,
    )


def add_checkpoint(
    session: Session,
    storage: Storage,
    job_id: str,
    token: str,
    step: int,
    metrics: dict[str, Any],
    stream: BinaryIO,
    filename: str,
) -> Checkpoint:
    job = _fenced(session, job_id, token, (JobStatus.RUNNING, JobStatus.PAUSED))  # nothing after a cancel
    existing = session.scalar(
        select(Checkpoint).where(
            Checkpoint.job_id == job.id, Checkpoint.attempt == job.attempt, Checkpoint.step == step
        )
    )
    if existing is not None:  # a retried upload: the first one is complete and recorded
        return existing
    stored = store_result_file(session, storage, job, stream, filename)
    ckpt = Checkpoint(
        id=new_id("ftckpt"),
        job_id=job.id,
        project_id=job.project_id,
        attempt=job.attempt,
        step=step,
        metrics=metrics,
        file_id=stored.id,
        created_at=utcnow(),
    )
    session.add(ckpt)
    add_event(session, job, f"Checkpoint saved at step {step}", data={"checkpoint_id": ckpt.id, "step": step})
    webhooks.emit_checkpoint(session, ckpt, job)
    return ckpt


def add_artifact(
    session: Session,
    storage: Storage,
    job_id: str,
    token: str,
    stream: BinaryIO,
    filename: str,
) -> StoredFile:
    job = _fenced(session, job_id, token, (JobStatus.RUNNING,))
    return store_result_file(session, storage, job, stream, filename)


def finish(session: Session, job_id: str, body: FinishRequest) -> Job:
    if (done := _already_ended(session, job_id, body.lease_token)) is not None:
        if done.status != JobStatus.SUCCEEDED:  # ended by the reaper, not by this finish: fenced off
            raise Conflict(f"Lease on {job_id} is not held by this worker.", code="lease_lost")
        return done
    job = _fenced(session, job_id, body.lease_token, (JobStatus.RUNNING,))
    owned = set(
        session.scalars(
            select(StoredFile.id).where(
                StoredFile.project_id == job.project_id,
                StoredFile.id.in_([body.adapter_file_id, *body.result_file_ids]),
            )
        )
    )
    missing = {body.adapter_file_id, *body.result_file_ids} - owned
    if missing:
        raise NotFound(f"Unknown result files: {sorted(missing)}")
    job.status = JobStatus.SUCCEEDED
    job.finished_at = utcnow()
    job.result_files = [body.adapter_file_id, *[f for f in body.result_file_ids if f != body.adapter_file_id]]
    job.fine_tuned_model = f"ft:{job.base_model or job.model}:{job.suffix or 'ipo'}:{job.id}"
    job.trained_tokens = body.trained_tokens
    release(job)
    add_event(session, job, f"New fine-tuned model created: {job.fine_tuned_model}")
    add_event(session, job, "The job has successfully completed")
    webhooks.emit_job(session, job, webhooks.JOB_SUCCEEDED)
    metrics.job_ended(session, job)
    return job


def fail(session: Session, settings: Settings, job_id: str, body: FailRequest) -> Job:
    if (done := _already_ended(session, job_id, body.lease_token)) is not None:
        return done
    job = _fenced(session, job_id, body.lease_token)
    if job.status != JobStatus.RUNNING:  # cancelled/paused while it crashed: keep the user's decision
        release(job)
        add_event(session, job, f"Attempt {job.attempt} ended: {body.message}", level="warn")
        return job
    fail_attempt(session, settings, job, body.code, body.message, retryable=body.retryable)
    return job


def fail_attempt(session: Session, settings: Settings, job: Job, code: str, message: str, *, retryable: bool) -> None:
    """End the current attempt: requeue for another one (resuming from a checkpoint) or fail the job."""
    job.failed_attempts += 1
    release(job)
    if retryable and job.failed_attempts < settings.max_attempts:
        job.status = JobStatus.QUEUED
        job.queued_at = utcnow()
        add_event(
            session,
            job,
            f"Attempt {job.attempt} failed ({code}: {message}); retrying "
            f"({job.failed_attempts}/{settings.max_attempts} attempts failed)",
            level="warn",
        )
        enqueue_dispatch(session, job)
        return
    job.status = JobStatus.FAILED
    job.finished_at = utcnow()
    if retryable:
        message = f"{message} (gave up after {job.failed_attempts} failed attempts)"
    job.error = {"code": code, "message": message, "param": None}
    add_event(session, job, f"Job failed: {message}", level="error")
    webhooks.emit_job(session, job, webhooks.JOB_FAILED)
    metrics.job_ended(session, job)


def stopped(session: Session, job_id: str, body: StoppedRequest) -> Job:
    if (done := _already_ended(session, job_id, body.lease_token)) is not None:
        return done
    job = _fenced(session, job_id, body.lease_token)
    release(job)
    if job.status == JobStatus.RUNNING:  # shutdown (deploy) or a stop nobody asked for: run it again
        job.status = JobStatus.QUEUED
        job.queued_at = utcnow()
        add_event(session, job, f"Worker stopped ({body.reason}); attempt {job.attempt} requeued")
        enqueue_dispatch(session, job)
    elif job.status == JobStatus.PAUSED:
        add_event(session, job, f"Job paused at step {job.step or 0}")
    return job


def release(job: Job) -> None:
    job.released_lease_token = job.lease_token
    job.lease_token = None
    job.lease_expires_at = None


def _already_ended(session: Session, job_id: str, token: str) -> Job | None:
    """The job, when ``token``'s attempt already ended: a retried end-of-attempt call is a no-op."""
    job = session.get(Job, job_id)
    ended = job is not None and job.lease_token is None and job.released_lease_token is not None
    if ended and job is not None and secrets.compare_digest(job.released_lease_token or "", token):
        return job
    return None
