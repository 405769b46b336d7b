"""The playground: type a conversation and see, side by side and streamed, the base model's reply and the
reply of one of the project's fine-tuned models or checkpoints (a running job's included).

The page lists what ``/v1/chat/completions`` accepts for this project; the browser posts each side's
request to ``/playground/chat`` (session cookie, same-origin), which runs the API's own forwarding
(``app.routes.chat.forward_chat``) and relays the SSE stream. Errors come back as JSON in OpenAI's shape.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy import select

from app.dashboard.pages import SECURITY_HEADERS, HtmlRoute, render
from app.dashboard.security import DashboardCaller, LoginRequired, SameOrigin
from app.deps import Ctx, DbSession
from app.errors import error_body
from app.models import Checkpoint, Job
from app.routes.chat import forward_chat
from app.services import model_catalog
from app.services.model_catalog import SYSTEM_OWNER
from app.services.views import checkpoint_view
from contracts.chat import ChatCompletionRequest

CHECKPOINTS_LISTED = 200


class JsonRoute(APIRoute):
    """For ``fetch``: no session is a 401 in OpenAI's error shape (not a redirect to the login page)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired:
                body = error_body("Log in to the dashboard first.", "authentication_error", None, "login_required")
                return JSONResponse(body, 401)

        return route


pages = APIRouter(include_in_schema=False, route_class=HtmlRoute)
api = APIRouter(include_in_schema=False, route_class=JsonRoute)


@pages.get("/playground")
def playground_page(request: Request, ctx: Ctx, session: DbSession, caller: DashboardCaller) -> Response:
    entries = model_catalog.list_models(session, caller.project_id, ctx.settings.resolved_models_dir)
    bases = [e.id for e in entries if e.owned_by == SYSTEM_OWNER]
    tuned = [{"id": e.id, "label": e.id} for e in entries if e.owned_by != SYSTEM_OWNER]
    rows = session.execute(
        select(Checkpoint, Job)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Job.project_id == caller.project_id, Job.fine_tuned_model_deleted_at.is_(None))
        .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
        .limit(CHECKPOINTS_LISTED)
    ).all()
    seen: set[str] = set()
    for ckpt, job in rows:
        name = checkpoint_view(ckpt, job).fine_tuned_model_checkpoint
        if name not in seen:  # two attempts' checkpoints at one step share a name; the newest answers
            seen.add(name)
            tuned.append({"id": name, "label": f"{name} ({job.status})"})
    context = {"caller": caller, "bases": bases, "tuned": tuned}
    return render(request, "playground.html", context)


@api.post("/playground/chat", dependencies=[SameOrigin])
async def playground_chat(request: Request, ctx: Ctx, caller: DashboardCaller, body: ChatCompletionRequest) -> Response:
    response = await forward_chat(request, ctx, caller.project_id, body, None)
    for header, value in SECURITY_HEADERS.items():
        response.headers.setdefault(header, value)
    return response
