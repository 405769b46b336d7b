"""Rows -> public objects (OpenAI shapes)."""

from __future__ import annotations

import json
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


METHOD_VIEWS_MAX = 1024
"""Distinct stored ``method`` blocks whose public form is kept (``_method_view``); the cache is emptied
when it is full."""

_method_views: dict[str, tuple[dict[str, Any], JobHyperparameters]] = {}


def _method_view(stored: dict[str, Any]) -> tuple[dict[str, Any], JobHyperparameters]:
    """The job's ``method`` as shown (validated, defaults spelled out, ``None`` left out) and OpenAI's
    top-level ``hyperparameters`` from it, before the worker's resolved values are applied.

    Validating the block is most of a job view's cost (a list page holds 20), and jobs of a project
    mostly share a few method blocks: the result is kept by the block's canonical JSON. The returned dict
    is shared between views: never mutate it (views are serialised, not edited)."""
    key = json.dumps(stored, sort_keys=True, separators=(",", ":"))
    hit = _method_views.get(key)
    if hit is None:
        method = Method.model_validate(stored)
        hp = method.params().hyperparameters
        top = JobHyperparameters(
            batch_size=hp.batch_size, learning_rate_multiplier=hp.learning_rate_multiplier, n_epochs=hp.n_epochs
        )
        hit = (method.model_dump(mode="json", exclude_none=True), top)
        if len(_method_views) >= METHOD_VIEWS_MAX:
            _method_views.clear()
        _method_views[key] = hit
    return hit


def job_object(row: Job) -> dict[str, Any]:
    """The public ``fine_tuning.job`` of a row as JSON-ready data, field for field what
    ``job_view(row).model_dump(mode="json")`` gives (tests/api/test_views.py checks it on every kind of row).

    The hot read routes serialise this directly: every value comes from the ledger, whose columns and
    stored ``method`` were validated on the way in, and building the pydantic objects only to dump them
    again was most of a list page's CPU time (bench/RESULTS.md, api_bench profile)."""
    method, hp = _method_view(row.method)
    resolved = row.resolved_hyperparameters
    top = {
        "batch_size": hp.batch_size,
        "learning_rate_multiplier": hp.learning_rate_multiplier,
        "n_epochs": hp.n_epochs,
    }
    if resolved:
        top = {k: resolved.get(k, v) for k, v in top.items()}
    error = row.error
    from_checkpoint = row.from_checkpoint_id
    return {
        "id": row.id,
        "object": "fine_tuning.job",
        "created_at": unix(row.created_at) or 0,
        "error": JobError(**error).model_dump(mode="json") if error else None,
        "fine_tuned_model": row.fine_tuned_model,
        "finished_at": unix(row.finished_at),
        "hyperparameters": top,
        "model": row.model,
        "organization_id": row.project_id,
        "result_files": list(row.result_files or []),
        "seed": row.seed,
        "status": row.status,
        "trained_tokens": row.trained_tokens,
        "training_file": row.training_file,
        "validation_file": row.validation_file,
        "integrations": list(row.integrations or []),
        "metadata": row.job_metadata,
        "method": method,
        "estimated_finish": row.estimated_finish,
        "user_provided_suffix": row.suffix,
        "resolved_hyperparameters": resolved,
        "attempt": row.attempt,
        "lineage": {
            "base_model": row.base_model or row.model,
            "parent_job_id": row.parent_job_id,
            "parent_checkpoint_id": row.parent_checkpoint_id,
            "from_checkpoint": from_checkpoint,
            "optimizer_state": "fresh" if from_checkpoint else None,
        },
        "step": row.step,
        "total_steps": row.total_steps,
        "n_gpus": row.n_gpus or 1,
    }


def job_view(row: Job) -> JobObject:
    """The public ``fine_tuning.job`` of a row (``job_object``, validated into the model)."""
    return JobObject.model_validate(job_object(row))


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
        n_gpus=row.n_gpus if (row.n_gpus or 1) > 1 else None,  # the default stays implicit, as it was created
    )


def event_id(row: JobEvent) -> str:
    return f"ftevent-{row.id}"


def event_object(row: JobEvent) -> dict[str, Any]:
    """The public ``fine_tuning.job.event`` of a row as JSON-ready data (what ``event_view`` dumps to; see
    ``job_object``)."""
    return {
        "id": event_id(row),
        "object": "fine_tuning.job.event",
        "created_at": unix(row.created_at) or 0,
        "level": row.level,
        "message": row.message,
        "type": row.type,
        "data": row.data,
    }


def event_view(row: JobEvent) -> EventObject:
    return EventObject.model_validate(event_object(row))


def page_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """``ListObject.page`` of already JSON-ready objects: what ``ListObject[...].page(...)`` dumps to."""
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def checkpoint_view(row: Checkpoint, job: Job) -> CheckpointObject:
    base = job.fine_tuned_model or f"ft:{job.base_model or job.model}:{job.suffix or 'ipo'}:{job.id}"
    # OpenAI's checkpoint metrics carry the step too (``metrics.step``), beside ``step_number``.
    metrics: dict[str, Any] = {"step": row.step, **(row.metrics or {})}
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
