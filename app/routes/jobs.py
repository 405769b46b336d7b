"""``/v1/fine_tuning/jobs``: create, list, retrieve, cancel/pause/resume, events (page or SSE stream)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from app.deps import Ctx, CurrentCaller, DbSession, IdempotencyKeyHeader
from app.errors import InvalidRequest
from app.routes.events_stream import sse_events
from app.routes.idempotent import run_idempotent
from app.routes.params import Cursor, JobId
from app.schemas.objects import CheckpointObject, ErrorResponse, EventObject, JobObject, ListObject
from app.schemas.requests import JobCreate
from app.services import events as events_service
from app.services import idempotency
from app.services import jobs as jobs_service
from app.services.views import checkpoint_view, event_view, job_view

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
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobObject:
    def produce() -> JobObject:
        job = jobs_service.create_job(
            session,
            project_id=caller.project_id,
            body=body,
            models_dir=ctx.settings.resolved_models_dir,
            storage=ctx.storage,
            max_active=ctx.settings.max_active_jobs,
        )
        session.flush()
        return job_view(job)

    print_ = idempotency.fingerprint("POST", "/v1/fine_tuning/jobs", body.model_dump(mode="json"))
    result = run_idempotent(ctx, session, caller, idempotency_key, print_, produce)
    return result  # type: ignore[no-any-return]


@router.get("", response_model=ListObject[JobObject])
def list_jobs(
    session: DbSession,
    caller: CurrentCaller,
    request: Request,
    after: Cursor = None,
    limit: Limit = 20,
) -> ListObject[JobObject]:
    metadata = _metadata_filters(request)
    rows, has_more = jobs_service.list_jobs(session, caller.project_id, after=after, limit=limit, metadata=metadata)
    data = [job_view(r) for r in rows]
    return ListObject[JobObject](
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


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
def retrieve_job(session: DbSession, caller: CurrentCaller, job_id: JobId) -> JobObject:
    return job_view(jobs_service.get_job(session, caller.project_id, job_id))


def _transition_route(name: str):  # type: ignore[no-untyped-def]
    action = {"cancel": jobs_service.cancel_job, "pause": jobs_service.pause_job, "resume": jobs_service.resume_job}[
        name
    ]

    def handler(
        ctx: Ctx, session: DbSession, caller: CurrentCaller, job_id: JobId, idempotency_key: IdempotencyKeyHeader = None
    ) -> JobObject:
        print_ = idempotency.fingerprint("POST", f"/v1/fine_tuning/jobs/{job_id}/{name}", None)
        result = run_idempotent(
            ctx, session, caller, idempotency_key, print_, lambda: job_view(action(session, caller.project_id, job_id))
        )
        return result  # type: ignore[no-any-return]

    handler.__name__ = f"{name}_job"
    router.add_api_route(f"/{{job_id}}/{name}", handler, methods=["POST"], response_model=JobObject)


for _name in ("cancel", "pause", "resume"):
    _transition_route(_name)


@router.get(
    "/{job_id}/events", response_model=ListObject[EventObject], responses={200: {"content": {"text/event-stream": {}}}}
)
def list_events(
    ctx: Ctx,
    session: DbSession,
    caller: CurrentCaller,
    job_id: JobId,
    after: Cursor = None,
    limit: Limit = 20,
    stream: bool = False,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> ListObject[EventObject] | StreamingResponse:
    job = jobs_service.get_job(session, caller.project_id, job_id)
    if stream or (accept or "").startswith("text/event-stream"):
        start = events_service.parse_event_cursor(last_event_id or after, "Last-Event-ID")
        return StreamingResponse(
            sse_events(ctx, job.id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    rows, has_more = events_service.list_events(session, job.id, after=after, limit=limit)
    data = [event_view(r) for r in rows]
    return ListObject[EventObject](
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get("/{job_id}/checkpoints", response_model=ListObject[CheckpointObject])
def list_checkpoints(
    session: DbSession, caller: CurrentCaller, job_id: JobId, after: Cursor = None, limit: Limit = 10
) -> ListObject[CheckpointObject]:
    rows, has_more = jobs_service.list_checkpoints(session, caller.project_id, job_id, after=after, limit=limit)
    job = jobs_service.get_job(session, caller.project_id, job_id)
    data = [checkpoint_view(r, job) for r in rows]
    return ListObject[CheckpointObject](
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )
