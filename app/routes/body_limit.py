"""Request body limits enforced while the body streams in, before a route reads it.

The ``Content-Length`` check alone is not enough: a chunked upload announces no length, and Starlette's
form parser would spool all of it to a temporary file before the route could look at its size. This
middleware counts the bytes as the ASGI server hands them over and raises ``RequestTooLarge`` (a 413 in
the OpenAI error shape) as soon as the limit is passed, so at most one chunk past the limit is ever read
and nothing reaches storage.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import RequestTooLarge

MULTIPART_ALLOWANCE = 64 * 1024
"""Room for the multipart framing and the small form fields around the file itself."""

Limit = tuple[int, str | None, str]
"""(max bytes, the error's ``param``, what the limit is about, for the message)."""


def limits_for(max_upload_bytes: int, max_request_body_bytes: int) -> Callable[[Scope], Limit | None]:
    def pick(scope: Scope) -> Limit | None:
        path: str = scope.get("path", "")
        if scope.get("method") == "POST" and path.rstrip("/") == "/v1/files":
            message = f"File is too large: the limit is {max_upload_bytes} bytes."
            return max_upload_bytes + MULTIPART_ALLOWANCE, "file", message
        if path.startswith("/v1/"):
            return (
                max_request_body_bytes,
                None,
                f"Request body is too large: the limit is {max_request_body_bytes} bytes.",
            )
        return None  # /internal/v1 (checkpoints, adapters) and health endpoints are not limited here

    return pick


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, pick: Callable[[Scope], Limit | None]) -> None:
        self.app = app
        self.pick = pick

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.pick(scope) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        max_bytes, param, message = limit
        announced = Headers(scope=scope).get("content-length", "")
        too_big_announced = announced.isdigit() and int(announced) > max_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if too_big_announced:  # refuse before reading a byte of it
                raise RequestTooLarge(message, param)
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > max_bytes:
                    raise RequestTooLarge(message, param)
            return msg

        await self.app(scope, limited_receive, send)
