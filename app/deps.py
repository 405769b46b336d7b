"""FastAPI dependencies: the app context, one session per request (committed before the response is
sent), the authenticated caller and the worker-token guard."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.auth import Caller, authenticate, check_worker_token
from app.db import session_scope
from app.services.jobs import EVENTS_WRITTEN, OUTBOX_WRITTEN
from app.state import AppContext


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


Ctx = Annotated[AppContext, Depends(get_ctx)]


def get_session(ctx: Ctx) -> Iterator[Session]:
    scope = session_scope(ctx.sessions)
    session = next(scope)
    yield session
    for _ in scope:  # commits (or rolls back and raises)
        pass
    # Ring the dispatcher only once the outbox rows are committed: woken earlier, it finds nothing
    # and sleeps a whole tick (bench/dispatch_latency.py measured ~1 s added to submit -> running).
    if session.info.pop(OUTBOX_WRITTEN, False):
        ctx.wake_dispatcher.set()
    if jobs := session.info.pop(EVENTS_WRITTEN, None):
        ctx.event_hub.wake(jobs)


# scope="function": the commit happens before the response leaves, so a client never sees a 200 for a
# write that then failed to commit.
DbSession = Annotated[Session, Depends(get_session, scope="function")]


def get_caller(ctx: Ctx, session: DbSession, authorization: Annotated[str | None, Header()] = None) -> Caller:
    caller = authenticate(session, authorization)
    # End the read-only lookup now: its connection goes back to the pool instead of being held while
    # the handler opens a second session (Idempotency-Key reservation). Under load, requests that each
    # held one connection while waiting for another starved the pool (500s after pool_timeout).
    session.commit()
    ctx.rate_limiter.check(caller.key_id)  # per key, per API process (see app.services.rate_limit)
    return caller


CurrentCaller = Annotated[Caller, Depends(get_caller)]


def require_worker(ctx: Ctx, authorization: Annotated[str | None, Header()] = None) -> None:
    check_worker_token(ctx.worker_token, authorization)


IdempotencyKeyHeader = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
