"""``GET /metrics`` (Prometheus text format); every HTTP request is timed by ``app.middleware.http_metrics``.

Unauthenticated like ``/healthz``: it exposes aggregates only (counts, latencies, per-worker
throughput), never a job, file or project id. Restrict it at the ingress if even that is too much.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.deps import Ctx
from app.services import metrics

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def scrape(ctx: Ctx) -> Response:
    return Response(metrics.render(ctx.sessions), media_type=CONTENT_TYPE_LATEST)
