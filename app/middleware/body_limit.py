"""Every request body is bounded in size and in time while it streams in, before a route reads it.

The ``Content-Length`` check alone is not enough: a chunked upload announces no length, and Starlette's
form parser would spool all of it to a temporary file before the route could look at its size. This
middleware counts the bytes as the ASGI server hands them over and raises ``RequestTooLarge`` (a 413 in
the OpenAI error shape) as soon as the limit is passed, so at most one chunk past the limit is ever read
and nothing reaches storage.

It also bounds time, which uvicorn does not (it has no timeout on a request body): a client that stops
sending for ``IPO_REQUEST_BODY_TIMEOUT_SECONDS`` gets a 408 (``RequestBodyTimeout``) and the connection
is closed; a small body (everything but file and artifact uploads) must arrive whole within that time.
Once the body is complete, ``receive`` is passed through untouched (Starlette waits on it for the
client's disconnect while a response streams).

Limits, by route (``BodyLimits.for_request``):

- ``POST /v1/files``: ``IPO_MAX_UPLOAD_BYTES`` (plus the multipart framing);
- ``POST /internal/v1/jobs/{id}/checkpoints`` and ``.../artifacts``: ``IPO_MAX_ARTIFACT_BYTES``;
- other ``/internal/v1`` bodies (a worker's JSON reports): ``INTERNAL_REPORT_BYTES``, or
  ``IPO_MAX_REQUEST_BODY_BYTES`` when that is larger;
- everything else (JSON bodies of ``/v1``, dashboard forms): ``IPO_MAX_REQUEST_BODY_BYTES``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import RequestBodyTimeout, RequestTooLarge

MULTIPART_ALLOWANCE = 64 * 1024
"""Room for the multipart framing and the small form fields around the file itself."""

INTERNAL_REPORT_BYTES = 32 << 20
"""The largest event batch the worker protocol allows (``contracts.internal.EventsRequest``: 1,000 events
with messages of up to 4,000 characters, each up to 4 bytes in UTF-8, plus their metrics) is about
16 MiB; a worker's batch must never be refused for its size, or its events would be dropped."""

_ARTIFACT_UPLOAD = re.compile(r"^/internal/v1/jobs/[^/]+/(checkpoints|artifacts)/?$")


@dataclass(frozen=True)
class BodyLimit:
    """The limits that apply to one request's body."""

    max_bytes: int
    param: str | None
    """The error's ``param`` (``file`` for an upload)."""
    message: str
    whole_body_deadline: bool
    """True: the whole body must arrive within the timeout (small bodies). False: only the gaps between
    chunks are bounded (uploads, which may take long on a slow link)."""


@dataclass(frozen=True)
class BodyLimits:
    """The settings behind every body limit (bytes; seconds for the timeout), and the choice by route."""

    max_upload_bytes: int
    max_request_body_bytes: int
    max_artifact_bytes: int
    timeout_seconds: float

    def for_request(self, scope: Scope) -> BodyLimit:
        """The limit for this request's method and path (the list in the module docstring)."""
        path: str = scope.get("path", "")
        if scope.get("method") == "POST" and path.rstrip("/") == "/v1/files":
            message = f"File is too large: the limit is {self.max_upload_bytes} bytes."
            return BodyLimit(self.max_upload_bytes + MULTIPART_ALLOWANCE, "file", message, False)
        if scope.get("method") == "POST" and _ARTIFACT_UPLOAD.match(path):
            message = f"Artifact is too large: the limit is {self.max_artifact_bytes} bytes (IPO_MAX_ARTIFACT_BYTES)."
            return BodyLimit(self.max_artifact_bytes + MULTIPART_ALLOWANCE, "file", message, False)
        if path.startswith("/internal/"):
            limit = max(self.max_request_body_bytes, INTERNAL_REPORT_BYTES)
            return BodyLimit(limit, None, f"Request body is too large: the limit is {limit} bytes.", True)
        message = f"Request body is too large: the limit is {self.max_request_body_bytes} bytes."
        return BodyLimit(self.max_request_body_bytes, None, message, True)


class BodyLimitMiddleware:
    """Wraps ``receive`` to count and time the body; raises ``RequestTooLarge`` or ``RequestBodyTimeout``
    into whoever reads it (FastAPI's body parsing lets both through to ``app.errors``' handler)."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_request(scope)
        timeout = self.limits.timeout_seconds
        announced = Headers(scope=scope).get("content-length", "")
        too_big_announced = announced.isdigit() and int(announced) > limit.max_bytes
        received = 0
        complete = False
        deadline = anyio.current_time() + timeout if limit.whole_body_deadline else None

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            if too_big_announced:  # refuse before reading a byte of it
                raise RequestTooLarge(limit.message, limit.param)
            wait = timeout if deadline is None else max(0.0, deadline - anyio.current_time())
            with anyio.move_on_after(wait) as waited:
                msg = await receive()
            if waited.cancelled_caught:
                raise RequestBodyTimeout(
                    f"The request body stalled: no data for {timeout:g} seconds."
                    if deadline is None
                    else f"The request body did not arrive within {timeout:g} seconds.",
                    None,
                )
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit.max_bytes:
                    raise RequestTooLarge(limit.message, limit.param)
                complete = not msg.get("more_body", False)
            else:  # http.disconnect
                complete = True
            return msg

        await self.app(scope, limited_receive, send)
