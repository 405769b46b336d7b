"""Server-Sent Events for a job: ids for ``Last-Event-ID`` replay, keep-alive comments, and the
stream ends once the job is terminal and every event has been sent.

Live events come from the process's shared feed of the job (``app.services.event_feed``): one poll
per job and tick, however many clients watch it. Events older than the feed are replayed from the
database by the stream that asks for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator

from starlette.concurrency import run_in_threadpool

from app.services.event_feed import Row
from app.state import AppContext

KEEPALIVE_SECONDS = 15.0


def _frame(row: Row) -> str:
    return f"id: ftevent-{row[0]}\nevent: fine_tuning.job.event\ndata: {row[1]}\n\n"


async def sse_events(ctx: AppContext, job_id: str, last_id: int | None) -> AsyncGenerator[str, None]:
    yield "retry: 2000\n\n"
    async with ctx.event_hub.subscribe(job_id, last_id) as feed:
        position = feed.trimmed
        from_db: set[int] = set()  # sent from a database read: skipped when the feed offers them too
        newest = last_id or 0

        async def read_db(after: int | None) -> AsyncIterator[str]:
            nonlocal newest
            rows, _ = await run_in_threadpool(ctx.event_poll, job_id, after)
            for row in rows:
                if row[0] not in from_db:
                    from_db.add(row[0])
                    newest = max(newest, row[0])
                    yield _frame(row)

        if feed.trimmed or (feed.base is not None and (last_id or 0) < feed.base):
            # The feed does not hold every event after this client's position: read those first.
            async for frame in read_db(last_id):
                yield frame
        last_write = time.monotonic()
        while True:
            changed = feed.changed
            rows = feed.rows_from(position)
            if rows is None:  # this client fell behind the feed's buffer: catch up from the database
                position = feed.end
                async for frame in read_db(newest):
                    yield frame
                continue
            position += len(rows)
            for row in rows:
                if row[0] not in from_db and (last_id is None or row[0] > last_id):
                    newest = max(newest, row[0])
                    last_write = time.monotonic()
                    yield _frame(row)
            if position < feed.end:
                continue
            if feed.terminal:
                yield "event: done\ndata: [DONE]\n\n"
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(0.0, KEEPALIVE_SECONDS - (time.monotonic() - last_write)))
            if time.monotonic() - last_write >= KEEPALIVE_SECONDS:
                yield ": keep-alive\n\n"
                last_write = time.monotonic()
