"""FastAPI dependencies: the app context, one session per request (committed before the response is
sent), the authenticated caller, the worker-token guard and the ``Idempotency-Key`` header.

The dependencies that never block are ``async def``: FastAPI runs a plain ``def`` dependency in the
thread pool, one hop per dependency per request (bench/api_bench.py's profile). Only the session's
commit or rollback, which talk to the database, go to the thread pool, and only when the request used it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth import Caller, check_worker_token
from app.errors import InvalidRequest, Unauthorized
from app.middleware.auth_gate import CALLER_STATE
from app.services.jobs import EVENTS_WRITTEN, OUTBOX_WRITTEN
from app.state import AppContext


async def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


Ctx = Annotated[AppContext, Depends(get_ctx)]


def _finish(session: Session, commit: bool) -> None:
    """Commit (or roll back) and close, as ``app.db.session_scope`` does: a failed commit is rolled back."""
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


async def _finish_off_loop(session: Session, commit: bool) -> None:
    # Shielded: a client that disconnects mid-request still gets its transaction ended and its
    # connection returned to the pool.
    with anyio.CancelScope(shield=True):
        if session.in_transaction():  # it holds a connection: commit/rollback is a database round trip
            await run_in_threadpool(_finish, session, commit)
        else:
            session.close()  # never used: nothing to end, no I/O


async def get_session(ctx: Ctx) -> AsyncIterator[Session]:
    session = ctx.sessions()  # no connection yet: the first query (in the route's thread) checks one out
    try:
        yield session
    except BaseException:
        await _finish_off_loop(session, commit=False)
        raise
    await _finish_off_loop(session, commit=True)  # raises (and rolls back) when the commit fails
    # Ring the dispatcher only once the outbox rows are committed: woken earlier, it finds nothing
    # and sleeps a whole tick (bench/dispatch_latency.py measured ~1 s added to submit -> running).
    if session.info.pop(OUTBOX_WRITTEN, False):
        ctx.wake_dispatcher.set()
    if jobs := session.info.pop(EVENTS_WRITTEN, None):
        ctx.event_hub.wake(jobs)


async def get_read_session(ctx: Ctx) -> AsyncIterator[Session]:
    """A session for a route that only reads: its connection is in autocommit mode (``ctx.read_sessions``),
    so each query is one round trip, with no BEGIN before and no COMMIT after (two of the three round
    trips of a one-query read), and nothing is left to commit: closing it does no I/O and stays on the
    event loop. A write through it would be committed statement by statement: routes that write, or
    need one snapshot across queries, take ``DbSession``."""
    session = ctx.read_sessions()
    try:
        yield session
    finally:
        session.close()


ReadSession = Annotated[Session, Depends(get_read_session, scope="function")]


# scope="function": the commit happens before the response leaves, so a client never sees a 200 for a
# write that then failed to commit.
DbSession = Annotated[Session, Depends(get_session, scope="function")]


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer ipo-sk-...`.")


async def get_caller(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    """The caller that ``AuthGateMiddleware`` authenticated (and rate-limited) before the body was read.

    ``_credentials`` only declares the bearer scheme in the OpenAPI document. A ``/v1`` route reached
    without the gate's answer is refused, never served unauthenticated.
    """
    caller: Caller | None = getattr(request.state, CALLER_STATE, None)
    if caller is None:
        raise Unauthorized("Missing or malformed API key. Send 'Authorization: Bearer ipo-sk-...'.")
    return caller


CurrentCaller = Annotated[Caller, Depends(get_caller)]


def require_worker(ctx: Ctx, authorization: Annotated[str | None, Header()] = None) -> None:
    """Checked again here (``AuthGateMiddleware`` already refused a wrong token before the body)."""
    check_worker_token(ctx.worker_token, authorization)


IDEMPOTENCY_KEY_MAX_LENGTH = 255
"""Stripe's and OpenAI's limit on an ``Idempotency-Key``."""


def get_idempotency_key(
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="1 to 255 printable ASCII characters; a retry with the same key and body replays "
            "the first answer for 24 hours.",
        ),
    ] = None,
) -> str | None:
    """The ``Idempotency-Key`` header, or None when absent. An empty, over-long or non-printable key is a
    400 naming the header: an empty one would otherwise be one key shared by every POST of the project."""
    if idempotency_key is None:
        return None
    if not idempotency_key.strip():
        raise InvalidRequest("The Idempotency-Key header is empty; omit it or send a key.", param="Idempotency-Key")
    if len(idempotency_key) > IDEMPOTENCY_KEY_MAX_LENGTH:
        raise InvalidRequest(
            f"The Idempotency-Key header is {len(idempotency_key)} characters long; "
            f"the limit is {IDEMPOTENCY_KEY_MAX_LENGTH}.",
            param="Idempotency-Key",
        )
    if not all(" " <= c <= "~" for c in idempotency_key):
        raise InvalidRequest("The Idempotency-Key header must be printable ASCII characters.", param="Idempotency-Key")
    return idempotency_key


IdempotencyKeyHeader = Annotated[str | None, Depends(get_idempotency_key)]
