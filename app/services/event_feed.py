"""One shared feed per job for every live event stream in this API process.

A job watched by 200 SSE clients costs one database poll per tick, not 200: a ``JobFeed`` polls the
job's new events and status and fans them out to its subscribers. A request that writes events wakes
the feed right after its commit (``EventHub.wake``), so a stream served by the process that received
the worker's report gets it at once; events written by other processes (another API replica, the
reaper) arrive on the next poll.

A job's event ids are handed out in commit order (``app.models.job.lock_jobs_of_new_events``), so a feed
polls strictly after the highest id it has seen and a ``Last-Event-ID`` resume misses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from app.models import Job, JobStatus
from app.services.events import events_since
from app.services.views import event_view

POLL_SECONDS = 0.5
BUFFER_EVENTS = 10_000
"""Events a feed keeps for its subscribers; a subscriber further behind re-reads the database."""

Row = tuple[int, str]
"""(event id, the event's JSON as served)."""
Poll = Callable[[str, int | None], tuple[list[Row], bool]]


@dataclass
class JobFeed:
    job_id: str
    base: int | None
    """Events with ids up to ``base`` predate the feed: subscribers replay those from the database."""
    buffer: list[Row] = field(default_factory=list)
    trimmed: int = 0
    """How many rows were dropped from the front of ``buffer`` (positions stay absolute)."""
    terminal: bool = False
    """The job ended and every one of its events is in ``buffer``."""
    subscribers: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def end(self) -> int:
        return self.trimmed + len(self.buffer)

    def rows_from(self, position: int) -> list[Row] | None:
        """Rows at absolute ``position`` onwards, or None if they were trimmed away."""
        if position < self.trimmed:
            return None
        return self.buffer[position - self.trimmed :]

    def add(self, rows: list[Row]) -> bool:
        self.buffer.extend(rows)
        if len(self.buffer) > BUFFER_EVENTS:
            drop = len(self.buffer) - BUFFER_EVENTS
            self.buffer = self.buffer[drop:]
            self.trimmed += drop
        return bool(rows)

    def publish(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class EventHub:
    """The feeds of this process, keyed by job id; each lives while it has subscribers."""

    def __init__(self, poll: Poll, poll_seconds: float = POLL_SECONDS) -> None:
        self._poll = poll
        self._poll_seconds = poll_seconds
        self._feeds: dict[str, JobFeed] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self, job_ids: Iterable[str]) -> None:
        """Poll these jobs' feeds now (thread-safe; called after a commit that wrote their events)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        for job_id in job_ids:
            if (feed := self._feeds.get(job_id)) is not None:
                loop.call_soon_threadsafe(feed.wake.set)

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: str, last_id: int | None) -> AsyncIterator[JobFeed]:
        self._loop = asyncio.get_running_loop()
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = self._feeds[job_id] = JobFeed(job_id, base=last_id)
            feed.task = asyncio.create_task(self._run(feed))
        feed.subscribers += 1
        try:
            yield feed
        finally:
            feed.subscribers -= 1
            if feed.subscribers == 0 and self._feeds.get(job_id) is feed:
                del self._feeds[job_id]
                if feed.task is not None:
                    feed.task.cancel()

    async def _run(self, feed: JobFeed) -> None:
        cursor = feed.base
        while True:
            try:
                rows, terminal = await run_in_threadpool(self._poll, feed.job_id, cursor)
            except Exception:  # the database is down: keep the streams open and try again
                rows, terminal = [], False
            if rows:
                cursor = max(cursor or 0, max(r[0] for r in rows))
            fresh = feed.add(rows)
            if fresh or terminal:
                feed.terminal = terminal and not fresh
                feed.publish()
            if feed.terminal:
                return
            feed.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(feed.wake.wait(), self._poll_seconds)


def db_poll(sessions: Callable[[], object]) -> Poll:
    """The poll a hub runs: every event of the job after ``since`` (all pages), and whether it ended."""

    def poll(job_id: str, since: int | None) -> tuple[list[Row], bool]:
        with sessions() as session:  # type: ignore[attr-defined]
            rows: list[Row] = []
            while True:
                page = events_since(session, job_id, since)
                rows += [(r.id, event_view(r).model_dump_json()) for r in page]
                if len(page) < 500:
                    break
                since = page[-1].id
            job = session.get(Job, job_id)
            return rows, job is None or JobStatus(job.status).terminal

    return poll
