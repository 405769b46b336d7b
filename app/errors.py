"""Domain errors and the one place that maps them (and every other failure) to OpenAI's error shape.

Services raise these; routes never build HTTP errors themselves. No stack trace or SQL ever reaches a
client: unexpected exceptions become a generic 500, database outages a 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.storage.base import StorageUnavailable
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


class RequestBodyRefused(StarletteHTTPException):
    """Raised from inside the ASGI ``receive`` channel (see ``app.middleware.body_limit``) while a request
    body streams in. It is an ``HTTPException`` so FastAPI's body parsing lets it through unchanged
    instead of turning it into a generic "error parsing the body" 400. The answer closes the connection:
    the unread rest of the body is never drained."""

    status = 400
    code = "invalid_body"

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(self.status, message)
        self.message = message
        self.param = param


class RequestTooLarge(RequestBodyRefused):
    """The body passed its limit (413): ``file_too_large`` for an upload's ``file``, else ``request_too_large``."""

    status = 413
    code = "request_too_large"

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message, param)
        if param == "file":
            self.code = "file_too_large"


class RequestBodyTimeout(RequestBodyRefused):
    """The client stopped sending its body, or sent it too slowly (408, ``IPO_REQUEST_BODY_TIMEOUT_SECONDS``)."""

    status = 408
    code = "request_timeout"


class IdempotencyMismatch(DomainError):
    status = 422
    code = "idempotency_key_reused"


class ServiceUnavailable(DomainError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape. ``message`` is made one line: clients print it, logs split on newlines."""
    one_line = " ".join(message.split())
    return {"error": {"message": one_line, "type": type_, "param": param, "code": code}}


def domain_error_response(exc: DomainError) -> JSONResponse:
    """The answer to a domain error, for the exception handler and for middleware (which runs outside it)."""
    headers: dict[str, str] = {}
    if exc.status == 503:
        headers["Retry-After"] = "5"
    elif isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.retryable is not None:
        headers["x-should-retry"] = "true" if exc.retryable else "false"
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=headers)


def database_unavailable_response(exc: Exception) -> JSONResponse:
    """503 for a database that is down (``OperationalError``/``DBAPIError``) or a pool that is exhausted."""
    if isinstance(exc, PoolTimeout):
        # Every database connection of this process is busy: overload, not a bug; the client retries.
        log.warning("database connection pool exhausted: %s", exc)
        body = error_body("The server is busy; retry shortly.", "server_error", None, "service_unavailable")
        return JSONResponse(body, 503, headers={"Retry-After": "1"})
    log.warning("database unavailable: %s", type(exc).__name__)
    body = error_body("The database is unavailable; retry shortly.", "server_error", None, "service_unavailable")
    return JSONResponse(body, 503, headers={"Retry-After": "5"})


_HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}

_SOURCES = ("body", "query", "path", "header", "form", "cookie")
_UNION_TAGS = {"int", "float", "str", "bool", "list", "dict", "none", "bytes"}
_UNION_TAG_PREFIXES = ("constrained-", "function-", "literal[", "json-or-python[", "tagged-union[", "nullable[")


def _is_union_tag(part: Any) -> bool:
    """Pydantic puts the tag of each union member it tried into ``loc`` (``constrained-int``,
    ``literal['auto']``, ``function-after[...]``); those are not fields."""
    if not isinstance(part, str):
        return False
    return part in _UNION_TAGS or part.startswith(_UNION_TAG_PREFIXES) or part.endswith("]")


def loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "method", "ipo", "lora", "r", "constrained-int")`` -> ``method.ipo.lora.r``;
    ``("header", "Idempotency-Key")`` -> ``Idempotency-Key`` (a header keeps its name as sent)."""
    if loc and loc[0] == "header":
        return str(loc[1]) if len(loc) > 1 else None
    parts = [str(p) for p in (loc[1:] if loc and loc[0] in _SOURCES else loc) if not _is_union_tag(p)]
    return ".".join(parts) or None


OTHER_ERRORS_NAMED = 3
"""How many further invalid fields a one-line validation message names (with their reasons) before counting."""


def describe_validation_errors(errors: Sequence[Any], prefix: str = "") -> tuple[str | None, str]:
    """The ``(param, one-line message)`` of a list of pydantic/FastAPI errors: the first error names its
    field (``param``); up to ``OTHER_ERRORS_NAMED`` others follow with their reasons, the rest are counted,
    so a misspelled field beside the missing one it was meant to be (``training_fil``) is named too.
    ``prefix`` is put before each field (``hyperparameters.``)."""
    if not errors:
        return (prefix.rstrip(".") or None), "Invalid request."

    def field(error: Any) -> str | None:
        name = loc_to_param(tuple(error.get("loc", ())))
        if not prefix:
            return name
        return prefix + name if name else prefix.rstrip(".")

    first = errors[0]
    param = field(first)
    message = str(first.get("msg", "invalid value"))
    message = f"{param}: {message}" if param else message
    others: dict[str | None, str] = {}
    for error in errors[1:]:
        name = field(error)
        if name != param and name not in others:
            others[name] = str(error.get("msg", "invalid value"))
    if others:
        named = [f"{name}: {msg}" if name else msg for name, msg in list(others.items())[:OTHER_ERRORS_NAMED]]
        rest = len(others) - len(named)
        message += (
            "; also "
            + "; ".join(named)
            + (f" (and {rest} more invalid field{'s' if rest > 1 else ''})" if rest else "")
        )
    return param, message


def _json_syntax_message(exc: RequestValidationError, error: dict[str, Any]) -> str:
    """``The request body is not valid JSON: Expecting value (line 1, column 12).`` from FastAPI's
    ``json_invalid`` error, whose ``loc`` holds a character offset (never a field)."""
    loc = error.get("loc", ())
    reason = (error.get("ctx") or {}).get("error") or "syntax error"
    offset = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    doc = exc.body if isinstance(exc.body, str) else None
    if offset is None or doc is None:
        return f"The request body is not valid JSON: {reason}."
    line = doc.count("\n", 0, offset) + 1
    column = offset - (doc.rfind("\n", 0, offset) + 1) + 1
    return f"The request body is not valid JSON: {reason} (line {line}, column {column})."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return domain_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if errors and errors[0].get("type") == "json_invalid":
            body = error_body(_json_syntax_message(exc, errors[0]), "invalid_request_error", None, "invalid_json")
            return JSONResponse(body, 400)
        param, message = describe_validation_errors(errors)
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), 400)

    @app.exception_handler(RequestBodyRefused)
    async def _body_refused(_: Request, exc: RequestBodyRefused) -> JSONResponse:
        # The unread rest of the body is not drained: the server closes the connection after this answer.
        return JSONResponse(
            error_body(exc.message, "invalid_request_error", exc.param, exc.code),
            exc.status,
            headers={"Connection": "close"},
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
    @app.exception_handler(PoolTimeout)
    async def _db_down(_: Request, exc: Exception) -> JSONResponse:
        return database_unavailable_response(exc)

    @app.exception_handler(StorageUnavailable)
    async def _storage_down(_: Request, exc: StorageUnavailable) -> JSONResponse:
        log.error("artifact storage unavailable: %s", exc)  # the store's name and reason: operators only
        return domain_error_response(ServiceUnavailable("Artifact storage is unavailable; try again later."))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Runs outside the request-log middleware (Starlette's ServerErrorMiddleware), which leaves the
        # request id bound for this line; the header is set here since that middleware's send is gone.
        log.exception("unhandled error", exc_info=exc)
        request_id = request_id_var.get()
        headers = {"X-Request-ID": request_id} if request_id else None
        body = error_body("Internal server error.", "server_error", None, "internal_error")
        return JSONResponse(body, 500, headers=headers)
