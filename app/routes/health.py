"""Liveness (the process answers) and readiness (the database and the broker answer: 503 otherwise). The
artifact store is checked too but reported as ``degraded`` with 200: most requests do not touch it, and a
store outage should not take every replica out of the load balancer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.deps import Ctx
from app.schemas.objects import HealthStatus, ReadyStatus

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthStatus)
def healthz() -> HealthStatus:
    return HealthStatus(status="ok")


def _check_db(ctx: Ctx) -> str | None:
    try:
        with ctx.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except Exception as exc:
        return type(exc).__name__


def _check_broker(ctx: Ctx) -> str | None:
    url = ctx.settings.resolved_broker_url
    if url.startswith("filesystem://"):
        return None
    try:
        from kombu import Connection

        with Connection(url, connect_timeout=2) as conn:  # type: ignore[no-untyped-call]  # kombu is untyped
            conn.ensure_connection(max_retries=1, timeout=2)
        return None
    except Exception as exc:
        return type(exc).__name__


@router.get("/readyz", response_model=ReadyStatus, responses={503: {"model": ReadyStatus}})
async def readyz(ctx: Ctx) -> JSONResponse:
    db, broker = await run_in_threadpool(_check_db, ctx), await run_in_threadpool(_check_broker, ctx)
    storage = await run_in_threadpool(ctx.storage.check)
    checks = {"database": db or "ok", "broker": broker or "ok", "storage": storage or "ok"}
    ok = db is None and broker is None
    status = ("ok" if storage is None else "degraded") if ok else "unavailable"
    return JSONResponse(
        {"status": status, "checks": checks},
        200 if ok else 503,
        headers=None if ok else {"Retry-After": "5"},
    )
