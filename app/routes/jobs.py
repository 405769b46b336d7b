"""``/v1/fine_tuning/jobs``: create, list, retrieve, cancel/pause/resume, events (page or SSE stream)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.orm import Session

from app.deps import Ctx, CurrentCaller, DbSession, IdempotencyKeyHeader, ReadSession
from app.errors import InvalidRequest
from app.models import Job
from app.routes.events_stream import sse_events
from app.routes.idempotent import run_idempotent
from app.routes.json_body import json_response
from app.routes.params import Cursor, JobId
from app.schemas.job_spec import JobSpec
from app.schemas.objects import CheckpointObject, ErrorResponse, EventObject, JobObject, ListObject
from app.schemas.requests import JobCreate
from app.services import events as events_service
from app.services import idempotency
from app.services import jobs as jobs_service
from app.services.views import checkpoint_view, event_object, job_object, job_view, page_object, spec_of_job

router = APIRouter(
    prefix="/v1/fine_tuning/jobs",
    tags=["fine-tuning"],
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        409: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
        429: {"model": ErrorResponse},
    },
)

Limit = Annotated[int, Query(ge=1, le=100)]
MAX_METADATA_FILTERS = 16


@router.post("", response_model=JobObject, responses={413: {"model": ErrorResponse}})
def create_job(
    ctx: Ctx,
    session: DbSession,
    caller: CurrentCaller,
    body: JobCreate,
    idempotency_key: IdempotencyKeyHeader,
) -> JobObject:
    def produce() -> JobObject:
        job = jobs_service.create_job(
            session,
            project_id=caller.project_id,
            body=body,
            models_dir=ctx.settings.resolved_models_dir,
            storage=ctx.storage,
            max_active=ctx.settings.max_active_jobs,
            max_gpus=ctx.settings.max_gpus_per_job,
            allowed_tracking_uris=ctx.settings.mlflow_allowed_uris,
        )
        session.flush()
        return job_view(job)

    fingerprint = idempotency.request_fingerprint("POST", "/v1/fine_tuning/jobs", body.model_dump(mode="json"))
    result = run_idempotent(ctx, session, caller, idempotency_key, fingerprint, produce)
    return result  # type: ignore[no-any-return]


@router.get("", response_model=ListObject[JobObject])
def list_jobs(
    session: ReadSession,
    caller: CurrentCaller,
    request: Request,
    after: Cursor = None,
    limit: Limit = 20,
) -> Response:
    metadata = _metadata_filters(request)
    rows, has_more = jobs_service.list_jobs(session, caller.project_id, after=after, limit=limit, metadata=metadata)
    return json_response(page_object([job_object(r) for r in rows], has_more))


def _metadata_filters(request: Request) -> dict[str, str]:
    """``?metadata[k]=v`` (OpenAI's filter syntax; the square brackets may arrive percent-encoded)."""
    metadata: dict[str, str] = {}
    for k, v in request.query_params.multi_items():
        if not (k.startswith("metadata[") and k.endswith("]")):
            continue
        key = k[len("metadata[") : -1]
        if not key or len(key) > 64 or len(v) > 512 or any(ord(c) < 32 or ord(c) == 127 for c in key + v):
            raise InvalidRequest(f"Invalid metadata filter {k!r}.", param="metadata")
        if key in metadata and metadata[key] != v:
            raise InvalidRequest(f"metadata[{key}] is given twice with different values.", param="metadata")
        metadata[key] = v
    if len(metadata) > MAX_METADATA_FILTERS:
        raise InvalidRequest(f"At most {MAX_METADATA_FILTERS} metadata filters are accepted.", param="metadata")
    return metadata


@router.get("/{job_id}", response_model=JobObject)
def retrieve_job(session: ReadSession, caller: CurrentCaller, job_id: JobId) -> Response:
    return json_response(job_object(jobs_service.get_job(session, caller.project_id, job_id)))


@router.get("/{job_id}/spec", response_model=JobSpec, response_model_exclude_none=True)
def job_spec(session: DbSession, caller: CurrentCaller, job_id: JobId) -> JobSpec:
    """The job as a spec file (extension): POSTing its create body asks for the same run again."""
    return spec_of_job(jobs_service.get_job(session, caller.project_id, job_id))


def _transition(
    ctx: Ctx,
    session: DbSession,
    caller: CurrentCaller,
    job_id: str,
    idempotency_key: str | None,
    action: Callable[[Session, str, str], Job],
    name: str,
) -> JobObject:
    """Run one user transition (``jobs_service.cancel_job`` and its siblings), honouring Idempotency-Key."""
    fingerprint = idempotency.request_fingerprint("POST", f"/v1/fine_tuning/jobs/{job_id}/{name}", None)
    result = run_idempotent(
        ctx,
        session,
        caller,
        idempotency_key,
        fingerprint,
        lambda: job_view(action(session, caller.project_id, job_id)),
    )
    return result  # type: ignore[no-any-return]


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(
    ctx: Ctx, session: DbSession, caller: CurrentCaller, job_id: JobId, idempotency_key: IdempotencyKeyHeader
) -> JobObject:
    """Cancel a validating, queued, running or paused job (409 once it has ended)."""
    return _transition(ctx, session, caller, job_id, idempotency_key, jobs_service.cancel_job, "cancel")


@router.post("/{job_id}/pause", response_model=JobObject)
def pause_job(
    ctx: Ctx, session: DbSession, caller: CurrentCaller, job_id: JobId, idempotency_key: IdempotencyKeyHeader
) -> JobObject:
    """Pause a running job: the worker saves a checkpoint and stops (409 unless it is running)."""
    return _transition(ctx, session, caller, job_id, idempotency_key, jobs_service.pause_job, "pause")


@router.post("/{job_id}/resume", response_model=JobObject)
def resume_job(
    ctx: Ctx, session: DbSession, caller: CurrentCaller, job_id: JobId, idempotency_key: IdempotencyKeyHeader
) -> JobObject:
    """Queue a paused job again; it resumes from its pause checkpoint (409 unless it is paused)."""
    return _transition(ctx, session, caller, job_id, idempotency_key, jobs_service.resume_job, "resume")


@router.get(
    "/{job_id}/events", response_model=ListObject[EventObject], responses={200: {"content": {"text/event-stream": {}}}}
)
def list_events(
    ctx: Ctx,
    session: ReadSession,
    caller: CurrentCaller,
    job_id: JobId,
    after: Cursor = None,
    limit: Limit = 20,
    stream: bool = False,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    checked_id = jobs_service.require_job(session, caller.project_id, job_id)
    if stream or (accept or "").startswith("text/event-stream"):
        start = events_service.parse_event_cursor(last_event_id or after, "Last-Event-ID")
        return StreamingResponse(
            sse_events(ctx, checked_id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    rows, has_more = events_service.list_events(session, checked_id, after=after, limit=limit)
    return json_response(page_object([event_object(r) for r in rows], has_more))


@router.get("/{job_id}/checkpoints", response_model=ListObject[CheckpointObject])
def list_checkpoints(
    session: DbSession, caller: CurrentCaller, job_id: JobId, after: Cursor = None, limit: Limit = 10
) -> ListObject[CheckpointObject]:
    rows, has_more = jobs_service.list_checkpoints(session, caller.project_id, job_id, after=after, limit=limit)
    job = jobs_service.get_job(session, caller.project_id, job_id)
    return ListObject[CheckpointObject].page([checkpoint_view(r, job) for r in rows], has_more)
