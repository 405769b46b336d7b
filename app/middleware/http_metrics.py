"""The middleware that times every HTTP request for ``/metrics`` (``app.routes.metrics``)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.services import metrics

UNMATCHED = "<unmatched>"
"""Route label of requests no route matched (404s): the raw path would let clients explode the label set."""


class HttpMetricsMiddleware:
    """Observes ``ipo_http_request_duration_seconds{method, route, status}``, ``route`` being the matched
    route's path template (``/v1/fine_tuning/jobs/{job_id}``), never the raw path. Timed to the response
    status, so an SSE stream or a long download counts its time to first byte."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            if observed:
                return
            observed = True
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", None) or UNMATCHED
            metrics.observe_http(scope["method"], template, status, time.perf_counter() - start)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                observe(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            observe(500)
            raise
