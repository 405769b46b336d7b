"""Liveness (the process answers) and readiness (the database and the broker answer)."""

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
    checks = {"database": db or "ok", "broker": broker or "ok"}
    ok = db is None and broker is None
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks},
        200 if ok else 503,
        headers=None if ok else {"Retry-After": "5"},
    )
