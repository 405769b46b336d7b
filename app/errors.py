"""Domain errors and the one place that maps them (and every other failure) to OpenAI's error shape.

Services raise these; routes never build HTTP errors themselves. No stack trace or SQL ever reaches a
client: unexpected exceptions become a generic 500, database outages a 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from contracts.logs import request_id_var

log = logging.getLogger(__name__)


class DomainError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = None
    retryable: bool | None = None
    """Sent as ``x-should-retry`` when set: the openai SDK retries 409/429 by default, which is pointless
    for a conflict that a retry cannot resolve (a job that is already cancelled)."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable


class InvalidRequest(DomainError):
    status = 400


class Unauthorized(DomainError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(DomainError):
    status = 404
    code = "not_found"


class Conflict(DomainError):
    status = 409
    code = "conflict"
    retryable = False


class Forbidden(DomainError):
    status = 403
    code = "forbidden"


class PayloadTooLarge(DomainError):
    status = 413
    code = "file_too_large"


class RateLimited(DomainError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, retry_after: int, param: str | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message, param=param, retryable=retryable)
        self.retry_after = max(1, retry_after)


class RequestTooLarge(StarletteHTTPException):
    """Raised from inside the ASGI ``receive`` channel (see ``app.routes.body_limit``) as soon as a request
    body passes its limit. It is an ``HTTPException`` so FastAPI's body parsing lets it through unchanged
    instead of turning it into a generic "error parsing the body" 400."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(413, message)
        self.message = message
        self.param = param


class IdempotencyMismatch(DomainError):
    status = 422
    code = "idempotency_key_reused"


class ServiceUnavailable(DomainError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}

_UNION_TAGS = {"int", "float", "str", "bool", "list", "dict", "none"}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "method", "ipo", "lora", "r", "constrained-int")`` -> ``method.ipo.lora.r``.

    Pydantic adds the tag of each union member it tried; those are not fields, so they are dropped.
    """
    parts: list[str] = []
    for p in loc[1:] if loc and loc[0] in ("body", "query", "path", "header", "form", "cookie") else loc:
        text = str(p)
        if isinstance(p, str) and (text in _UNION_TAGS or any(c in text for c in "[]-")):
            continue
        parts.append(text)
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        headers: dict[str, str] = {}
        if exc.status == 503:
            headers["Retry-After"] = "5"
        elif isinstance(exc, RateLimited):
            headers["Retry-After"] = str(exc.retry_after)
        if exc.retryable is not None:
            headers["x-should-retry"] = "true" if exc.retryable else "false"
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _loc_to_param(tuple(first.get("loc", ())))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), 400)

    @app.exception_handler(RequestTooLarge)
    async def _too_large(_: Request, exc: RequestTooLarge) -> JSONResponse:
        code = "file_too_large" if exc.param == "file" else "request_too_large"
        # The unread rest of the body is not drained: the server closes the connection after this answer.
        return JSONResponse(
            error_body(exc.message, "invalid_request_error", exc.param, code), 413, headers={"Connection": "close"}
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's answer to a body it could not parse: a truncated multipart form, a JSON document
            # nested deeper than the parser allows, and the like.
            message = "The request body could not be parsed (malformed, truncated or too deeply nested)."
        return JSONResponse(error_body(message, "invalid_request_error", None, code), exc.status_code, exc.headers)

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def _db_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", type(exc).__name__)
        body = error_body("The database is unavailable; retry shortly.", "server_error", None, "service_unavailable")
        return JSONResponse(body, 503, headers={"Retry-After": "5"})

    @app.exception_handler(PoolTimeout)
    async def _overloaded(_: Request, exc: Exception) -> JSONResponse:
        # Every database connection of this process is busy: overload, not a bug; the client retries.
        log.warning("database connection pool exhausted: %s", exc)
        body = error_body("The server is busy; retry shortly.", "server_error", None, "service_unavailable")
        return JSONResponse(body, 503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Runs outside the request-log middleware (Starlette's ServerErrorMiddleware), which leaves the
        # request id bound for this line; the header is set here since that middleware's send is gone.
        log.exception("unhandled error", exc_info=exc)
        request_id = request_id_var.get()
        headers = {"X-Request-ID": request_id} if request_id else None
        body = error_body("Internal server error.", "server_error", None, "internal_error")
        return JSONResponse(body, 500, headers=headers)
