"""Wraps a POST handler so it honours ``Idempotency-Key`` (see ``app.services.idempotency``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.auth import Caller
from app.services import idempotency
from app.state import AppContext


def run_idempotent(
    ctx: AppContext,
    session: Session,
    caller: Caller,
    key: str | None,
    fingerprint: str,
    produce: Callable[[], BaseModel],
    status: int = 200,
    on_replay: Callable[[], None] | None = None,
) -> Any:
    """Run ``produce`` once per (project, key); replay its first answer to retries."""
    if key is None:
        return produce()
    replay = idempotency.reserve(ctx.sessions, caller.project_id, key, fingerprint)
    if replay is not None:
        if on_replay is not None:
            on_replay()
        return JSONResponse(replay.response_body, replay.response_status or 200, headers=idempotency.replay_headers())
    try:
        result = produce()
    except BaseException:  # refused or failed: free the key so a retry runs it again
        idempotency.release(ctx.sessions, caller.project_id, key)
        raise
    idempotency.record(session, caller.project_id, key, status, result.model_dump(mode="json"))
    return result
