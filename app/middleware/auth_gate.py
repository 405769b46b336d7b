"""Authentication from the ``Authorization`` header, before a single byte of the body is read.

FastAPI reads (and for multipart, spools to disk) a request's body before it resolves the route's
dependencies, so a credentials check done as a dependency comes after the body has been read: an
anonymous client could make the API read a 100 MB body to get its 401. This middleware answers first:

- ``/internal/v1``: the worker token (constant-time compare);
- ``/v1``: an API key, looked up (``app.auth.authenticate``, through the short-lived ``app.auth.KeyCache``)
  and the key's rate limit taken; the ``Caller`` is left in ``request.state.caller`` for the route's
  ``CurrentCaller`` dependency.

A refusal (401, 429, 503 when the database is down) is the usual OpenAI error body and closes the
connection when the request announced a body, so the unread body is never drained either. Other paths
(health, metrics, the dashboard, whose cookie is checked by its own dependency and whose POSTs carry
at most a small form) pass through.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.auth import Caller, check_worker_token
from app.errors import DomainError, database_unavailable_response, domain_error_response
from app.state import AppContext

CALLER_STATE = "caller"
"""``request.state.caller``: the authenticated ``Caller`` of a ``/v1`` request."""


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


class AuthGateMiddleware:
    """Refuses ``/v1`` and ``/internal/v1`` requests without valid credentials before the app reads them."""

    def __init__(self, app: ASGIApp, ctx: AppContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "") if scope["type"] == "http" else ""
        if not (_under(path, "/v1") or _under(path, "/internal/v1")):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        authorization = headers.get("authorization")
        refusal: Response | None = None
        try:
            if _under(path, "/internal/v1"):
                check_worker_token(self.ctx.worker_token, authorization)
            else:
                # A key looked up in the last IPO_API_KEY_CACHE_SECONDS and an in-process rate limit are
                # answered here, on the event loop; a database lookup or a Redis round trip blocks, so it
                # runs in the thread pool.
                limiter = self.ctx.rate_limiter
                caller = self.ctx.key_cache.cached(authorization)
                if caller is not None and not limiter.blocking:
                    limiter.check(caller.key_id)
                else:
                    caller = await run_in_threadpool(self._limited_caller, authorization)
                scope.setdefault("state", {})[CALLER_STATE] = caller
        except DomainError as exc:
            refusal = domain_error_response(exc)
        except (OperationalError, DBAPIError, PoolTimeout) as exc:
            refusal = database_unavailable_response(exc)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        if _announces_body(headers):
            refusal.headers["Connection"] = "close"  # the body stays unread: this connection cannot be reused
        await refusal(scope, receive, send)

    def _limited_caller(self, authorization: str | None) -> Caller:
        # A miss looks the key up on a short session of its own: the connection goes back to the pool
        # before the route runs.
        caller = self.ctx.key_cache.authenticate(self.ctx.read_sessions, authorization)
        self.ctx.rate_limiter.check(caller.key_id)
        return caller


def _announces_body(headers: Headers) -> bool:
    length = headers.get("content-length", "")
    return "transfer-encoding" in headers or (length.isdigit() and int(length) > 0)
