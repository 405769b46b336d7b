"""Server-Sent Events for a job: ids for ``Last-Event-ID`` replay, keep-alive comments, and the
stream ends once the job is terminal and every event has been sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from app.models import Job, JobStatus
from app.services.events import events_since
from app.services.views import event_view
from app.state import AppContext

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0


def _poll(ctx: AppContext, job_id: str, last_id: int | None) -> tuple[list[tuple[int, str]], bool]:
    with ctx.sessions() as session:
        rows = events_since(session, job_id, last_id)
        job = session.get(Job, job_id)
        terminal = job is None or JobStatus(job.status).terminal
        return [(r.id, event_view(r).model_dump_json()) for r in rows], terminal


async def sse_events(ctx: AppContext, job_id: str, last_id: int | None) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    last_sent = time.monotonic()
    while True:
        rows, terminal = await run_in_threadpool(_poll, ctx, job_id, last_id)
        for event_id, payload in rows:
            last_id = event_id
            yield f"id: ftevent-{event_id}\nevent: fine_tuning.job.event\ndata: {payload}\n\n"
            last_sent = time.monotonic()
        if terminal and not rows:
            yield "event: done\ndata: [DONE]\n\n"
            return
        if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if not rows:
            await asyncio.sleep(POLL_SECONDS)
