"""Dashboard pages: login/logout, the job list, a job's page and its cancel/pause/resume buttons.

Thin like the API's routes: parse, call the same services, render a template. The live parts (event
stream, status, downloads) are in ``app.dashboard.feeds``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session

from app.auth import end_dashboard_session, start_dashboard_session
from app.dashboard import feeds, playground
from app.dashboard.pages import STATIC_DIR, HtmlRoute, render
from app.dashboard.security import (
    DashboardCaller,
    FormFields,
    SameOrigin,
    SessionCookie,
    check_key,
    clear_session_cookie,
    set_session_cookie,
)
from app.deps import Ctx, DbSession
from app.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from app.models import Job, JobStatus
from app.models.job import ACTIVE_STATUSES
from app.routes.params import Cursor, JobId
from app.services import files as files_service
from app.services import jobs as jobs_service
from app.services.views import checkpoint_view, job_view
from contracts.method import Method

router = APIRouter(include_in_schema=False, route_class=HtmlRoute)
router.include_router(feeds.router)
router.include_router(playground.pages)
router.include_router(playground.api)

PAGE_SIZE = 20
CHECKPOINTS_SHOWN = 100
ACTIVE = {s.value for s in ACTIVE_STATUSES}


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)


@router.get("/login")
def login_page(request: Request) -> Response:
    return render(request, "login.html", {"error": None})


@router.post("/login", dependencies=[SameOrigin])
def login(request: Request, ctx: Ctx, session: DbSession, form: FormFields) -> Response:
    api_key = form.get("api_key", "").strip()
    try:
        caller = check_key(ctx, session, api_key)
    except Unauthorized as exc:
        return render(request, "login.html", {"error": exc.message}, status_code=401)
    session_id = start_dashboard_session(session, caller, ctx.settings.dashboard_session_seconds)
    response = RedirectResponse("/", status_code=303)
    set_session_cookie(response, request, session_id)
    return response


@router.post("/logout", dependencies=[SameOrigin])
def logout(session: DbSession, session_id: SessionCookie = None) -> Response:
    if session_id:
        end_dashboard_session(session, session_id)
    response = RedirectResponse("/login", status_code=303)
    clear_session_cookie(response)
    return response


@router.get("/")
def job_list(
    request: Request,
    session: DbSession,
    caller: DashboardCaller,
    status: Annotated[str, Query(max_length=20)] = "",
    after: Cursor = None,
) -> Response:
    if status and status not in {s.value for s in JobStatus}:
        raise InvalidRequest(f"Unknown status {status!r}.", param="status")
    rows, has_more = jobs_service.list_jobs(
        session,
        caller.project_id,
        after=after,
        limit=PAGE_SIZE,
        metadata={},
        status=JobStatus(status) if status else None,
    )
    context = {
        "caller": caller,
        "jobs": [job_view(r) for r in rows],
        "has_more": has_more,
        "status": status,
        "after": after,
        "statuses": [s.value for s in JobStatus],
        "counts": jobs_service.count_by_status(session, caller.project_id),
    }
    return render(request, "jobs.html", context)


@router.get("/jobs/{job_id}")
def job_page(request: Request, session: DbSession, caller: DashboardCaller, job_id: JobId) -> Response:
    return render(request, "job.html", _job_context(session, caller.project_id, job_id) | {"caller": caller})


def _job_context(session: DbSession, project_id: str, job_id: str) -> dict[str, Any]:
    row = jobs_service.get_job(session, project_id, job_id)
    job = job_view(row)
    checkpoints, more_checkpoints = jobs_service.list_checkpoints(
        session, project_id, job_id, after=None, limit=CHECKPOINTS_SHOWN
    )
    results = []
    for i, file_id in enumerate(job.result_files):
        try:
            name = files_service.get_file(session, project_id, file_id).filename
        except NotFound:
            name = None  # deleted since: listed, not downloadable
        results.append({"id": file_id, "name": name, "label": "adapter" if i == 0 else "result"})
    if job.resolved_hyperparameters:
        hyperparameters, resolved = job.resolved_hyperparameters, True
    else:
        params = Method.model_validate(row.method).params()
        hyperparameters = {
            **params.hyperparameters.model_dump(),
            **{f"lora_{k}": v for k, v in params.lora.model_dump().items()},
        }
        resolved = False
    return {
        "job": job,
        "terminal": JobStatus(job.status).terminal,
        "can_cancel": job.status in ACTIVE,
        "can_pause": job.status == JobStatus.RUNNING,
        "can_resume": job.status == JobStatus.PAUSED,
        "hyperparameters": dict(sorted(hyperparameters.items())),
        "resolved": resolved,
        "checkpoints": [checkpoint_view(c, row) for c in checkpoints],
        "more_checkpoints": more_checkpoints,
        "results": results,
        "action_error": None,
    }


def _job_action(
    request: Request,
    session: DbSession,
    caller: DashboardCaller,
    job_id: str,
    action: Callable[[Session, str, str], Job],
) -> Response:
    """Run a button's transition (the API's own service call); a 409 is shown on the job's page."""
    try:
        action(session, caller.project_id, job_id)
    except Conflict as exc:  # same rule and status as the API's 409, shown on the job's page
        context = _job_context(session, caller.project_id, job_id) | {"caller": caller, "action_error": exc.message}
        return render(request, "job.html", context, status_code=409)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.post("/jobs/{job_id}/cancel", dependencies=[SameOrigin])
def dashboard_cancel_job(request: Request, session: DbSession, caller: DashboardCaller, job_id: JobId) -> Response:
    return _job_action(request, session, caller, job_id, jobs_service.cancel_job)


@router.post("/jobs/{job_id}/pause", dependencies=[SameOrigin])
def dashboard_pause_job(request: Request, session: DbSession, caller: DashboardCaller, job_id: JobId) -> Response:
    return _job_action(request, session, caller, job_id, jobs_service.pause_job)


@router.post("/jobs/{job_id}/resume", dependencies=[SameOrigin])
def dashboard_resume_job(request: Request, session: DbSession, caller: DashboardCaller, job_id: JobId) -> Response:
    return _job_action(request, session, caller, job_id, jobs_service.resume_job)
