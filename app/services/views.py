"""Rows -> public objects (OpenAI shapes)."""

from __future__ import annotations

from typing import Any

from app.models import Checkpoint, Job, JobEvent, StoredFile, WebhookDelivery, WebhookEndpoint
from app.models.base import unix
from app.schemas.job_spec import JobSpec
from app.schemas.objects import (
    CheckpointObject,
    EventObject,
    FileObject,
    JobError,
    JobHyperparameters,
    JobLineage,
    JobObject,
    WebhookDeliveryObject,
    WebhookEndpointObject,
)
from contracts.integrations import parse_integrations
from contracts.method import Method


def file_view(row: StoredFile) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=unix(row.created_at) or 0,
        filename=row.filename,
        purpose=row.purpose,
        status=row.status,
        status_details=row.status_details,
    )


def job_view(row: Job) -> JobObject:
    method = Method.model_validate(row.method)
    hp = method.params().hyperparameters
    resolved = row.resolved_hyperparameters or {}
    top = JobHyperparameters(
        batch_size=resolved.get("batch_size", hp.batch_size),
        learning_rate_multiplier=resolved.get("learning_rate_multiplier", hp.learning_rate_multiplier),
        n_epochs=resolved.get("n_epochs", hp.n_epochs),
    )
    return JobObject(
        id=row.id,
        created_at=unix(row.created_at) or 0,
        error=JobError(**row.error) if row.error else None,
        fine_tuned_model=row.fine_tuned_model,
        finished_at=unix(row.finished_at),
        hyperparameters=top,
        model=row.model,
        organization_id=row.project_id,
        result_files=list(row.result_files or []),
        seed=row.seed,
        status=row.status,
        trained_tokens=row.trained_tokens,
        training_file=row.training_file,
        validation_file=row.validation_file,
        integrations=list(row.integrations or []),
        metadata=row.job_metadata,
        method=method.model_dump(mode="json", exclude_none=True),
        estimated_finish=row.estimated_finish,
        user_provided_suffix=row.suffix,
        resolved_hyperparameters=row.resolved_hyperparameters,
        attempt=row.attempt,
        lineage=JobLineage(
            base_model=row.base_model or row.model,
            parent_job_id=row.parent_job_id,
            parent_checkpoint_id=row.parent_checkpoint_id,
            from_checkpoint=row.from_checkpoint_id,
            optimizer_state="fresh" if row.from_checkpoint_id else None,
        ),
        step=row.step,
        total_steps=row.total_steps,
    )


def spec_of_job(row: Job) -> JobSpec:
    """The job's create body as a spec (``app.schemas.job_spec``): what to POST to ask for the same run.

    ``method`` comes back with its defaults spelled out and ``seed`` is the job's actual seed, so the
    spec of a job created from this spec is identical to it.
    """
    return JobSpec(
        model=row.model,
        training_file=row.training_file,
        validation_file=row.validation_file,
        suffix=row.suffix,
        seed=row.seed,
        metadata=row.job_metadata,
        method=Method.model_validate(row.method),
        integrations=parse_integrations(row.integrations) or None,
        from_checkpoint=row.from_checkpoint_id,
    )


def event_id(row: JobEvent) -> str:
    return f"ftevent-{row.id}"


def event_view(row: JobEvent) -> EventObject:
    return EventObject(
        id=event_id(row),
        created_at=unix(row.created_at) or 0,
        level=row.level,
        message=row.message,
        type=row.type,
        data=row.data,
    )


def checkpoint_view(row: Checkpoint, job: Job) -> CheckpointObject:
    base = job.fine_tuned_model or f"ft:{job.base_model or job.model}:{job.suffix or 'ipo'}:{job.id}"
    metrics: dict[str, Any] = dict(row.metrics or {})
    return CheckpointObject(
        id=row.id,
        created_at=unix(row.created_at) or 0,
        fine_tuned_model_checkpoint=f"{base}:ckpt-step-{row.step}",
        fine_tuning_job_id=row.job_id,
        metrics=metrics,
        step_number=row.step,
        file_id=row.file_id,
    )


def webhook_endpoint_view(row: WebhookEndpoint, *, with_secret: bool = False) -> WebhookEndpointObject:
    return WebhookEndpointObject(
        id=row.id,
        url=row.url,
        events=row.events,
        description=row.description,
        status=row.status,
        created_at=unix(row.created_at) or 0,
        secret=row.secret if with_secret else None,
    )


def webhook_delivery_view(row: WebhookDelivery) -> WebhookDeliveryObject:
    return WebhookDeliveryObject(
        id=row.id,
        event_id=row.event_id,
        event_type=row.event_type,
        status=row.status,
        attempts=row.attempts,
        response_status_code=row.response_status,
        last_error=row.last_error,
        created_at=unix(row.created_at) or 0,
        last_attempt_at=unix(row.last_attempt_at),
        next_attempt_at=unix(row.next_attempt_at),
        delivered_at=unix(row.delivered_at),
    )
