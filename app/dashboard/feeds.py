"""The dashboard's live and binary endpoints, authenticated by the session cookie: the job's event
stream (the API's own SSE generator), its status for the page's poller, and file downloads (the
API's file-content service). ``EventSource`` cannot send an ``Authorization`` header, which is why
these exist next to ``/v1`` instead of the public API accepting cookies."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.dashboard.pages import HtmlRoute
from app.dashboard.security import DashboardCaller
from app.deps import Ctx, DbSession
from app.routes.events_stream import sse_events
from app.routes.files import file_download
from app.routes.params import Cursor, FileId, JobId
from app.services import events as events_service
from app.services import files as files_service
from app.services import jobs as jobs_service

router = APIRouter(include_in_schema=False, route_class=HtmlRoute)


@router.get("/jobs/{job_id}/stream")
def job_stream(
    ctx: Ctx,
    session: DbSession,
    caller: DashboardCaller,
    job_id: JobId,
    after: Cursor = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    job = jobs_service.get_job(session, caller.project_id, job_id)
    start = events_service.parse_event_cursor(last_event_id or after, "Last-Event-ID")
    return StreamingResponse(
        sse_events(ctx, job.id, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/jobs/{job_id}/status")
def job_status(session: DbSession, caller: DashboardCaller, job_id: JobId) -> JSONResponse:
    job = jobs_service.get_job(session, caller.project_id, job_id)
    return JSONResponse({"status": job.status, "step": job.step, "total_steps": job.total_steps})


@router.get("/files/{file_id}/download")
def download_file(ctx: Ctx, session: DbSession, caller: DashboardCaller, file_id: FileId) -> Response:
    return file_download(ctx, files_service.get_file(session, caller.project_id, file_id))


@router.get("/jobs/{job_id}/checkpoints/{checkpoint_id}/download")
def download_checkpoint(
    ctx: Ctx, session: DbSession, caller: DashboardCaller, job_id: JobId, checkpoint_id: FileId
) -> Response:
    checkpoint = jobs_service.get_checkpoint(session, caller.project_id, job_id, checkpoint_id)
    return file_download(ctx, files_service.get_file(session, caller.project_id, checkpoint.file_id))
