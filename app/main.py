"""``create_app()``: the FastAPI application (public ``/v1``, worker ``/internal/v1``, health).

The API process never imports torch, transformers, trl or peft: it starts fast and stays small.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.auth import KeyCache
from app.dashboard import routes as dashboard
from app.db import make_engine, make_sessionmaker
from app.errors import install_error_handlers
from app.leader_loops import LeaderLoops
from app.middleware.auth_gate import AuthGateMiddleware
from app.middleware.body_limit import BodyLimitMiddleware, BodyLimits
from app.middleware.http_metrics import HttpMetricsMiddleware
from app.middleware.request_log import RequestLogMiddleware
from app.routes import chat, files, health, internal, jobs, metrics, models, schemas, webhooks
from app.services.dispatch import Doorbell
from app.services.event_feed import EventHub, db_poll
from app.services.rate_limit import make_rate_limiter
from app.settings import Settings, get_settings
from app.state import AppContext
from app.storage import open_storage

log = logging.getLogger(__name__)


def build_context(settings: Settings) -> AppContext:
    engine = make_engine(settings.resolved_database_url, settings.db_pool_size)
    sessions = make_sessionmaker(engine)
    poll = db_poll(sessions)
    return AppContext(
        settings=settings,
        engine=engine,
        sessions=sessions,
        read_sessions=make_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT")),
        storage=open_storage(settings.resolved_storage_url, settings.storage_public_endpoint_url),
        worker_token=settings.resolved_worker_token(),
        rate_limiter=make_rate_limiter(settings.rate_limit_per_minute, settings.resolved_redis_url),
        key_cache=KeyCache(settings.api_key_cache_seconds),
        event_hub=EventHub(poll),
        event_poll=poll,
    )


def create_app(settings: Settings | None = None, doorbell: Doorbell | None = None) -> FastAPI:
    settings = settings or get_settings()
    ctx = build_context(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One leader across all API processes on this database runs the singleton loops (app.services.leader).
        loops = LeaderLoops(
            ctx.sessions,
            settings,
            ctx.wake_dispatcher,
            dispatcher=settings.run_dispatcher,
            webhooks=settings.run_webhook_sender,
            doorbell=doorbell,
        )
        loops.start()
        if settings.storage_presign_seconds and not settings.resolved_storage_url.startswith("s3://"):
            log.warning("IPO_STORAGE_PRESIGN_SECONDS applies to s3:// storage only: downloads stream through the API")
        if (problem := await run_in_threadpool(ctx.storage.check)) is not None:
            log.error(
                "artifact storage %s is not usable: %s (uploads answer 503)", settings.resolved_storage_url, problem
            )
        try:
            yield
        finally:
            if (gateway := getattr(app.state, "inference", None)) is not None:
                await gateway.aclose()
            loops.stop()
            ctx.engine.dispose()

    app = FastAPI(
        title="ipo-align",
        version="0.1.0",
        summary="IPO/DPO preference alignment with QLoRA, behind an OpenAI-compatible fine-tuning API.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    # Added innermost first: a request meets RequestLog, HttpMetrics, AuthGate, then BodyLimit.
    limits = BodyLimits(
        max_upload_bytes=settings.max_upload_bytes,
        max_request_body_bytes=settings.max_request_body_bytes,
        max_artifact_bytes=settings.max_artifact_bytes,
        timeout_seconds=settings.request_body_timeout_seconds,
    )
    app.add_middleware(BodyLimitMiddleware, limits=limits)
    app.add_middleware(AuthGateMiddleware, ctx=ctx)  # credentials before a byte of the body is read
    app.add_middleware(HttpMetricsMiddleware)  # times everything, 401s and 413s included
    app.add_middleware(RequestLogMiddleware)  # outermost: the request id is bound for every line logged
    for module in (health, metrics, files, jobs, models, chat, webhooks, internal, schemas):
        app.include_router(module.router)
    app.include_router(dashboard.router)  # the web dashboard at / (HTML, not in the OpenAPI schema)
    app.mount("/static", dashboard.static_files(), name="static")
    return app
