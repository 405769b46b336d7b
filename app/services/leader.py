"""Which API process runs the singleton loops (outbox dispatcher + lease reaper, webhook sender).

Several API processes (``--workers N``, or replicas behind a load balancer) share one database; exactly
one of them should dispatch, reap and send webhooks. On Postgres the leader is whoever holds the session
advisory lock ``LEADER_LOCK_ID`` (``pg_try_advisory_lock``), taken on a dedicated connection of its own
(not a pooled one, so a pool recycle never drops it). Postgres releases a session lock when its
connection ends, so a leader that dies (process killed, host gone, connection cut) frees the lock at
once, and a follower, which retries every ``retry_seconds``, takes over. The leader re-checks its
connection as often; if the check fails it stops acting as leader and starts trying again.

Overlap: a leader whose connection broke acts as leader until its next check (at most ``retry_seconds``)
while a follower may already hold the lock. That is safe here because every singleton step is a guarded
database update (a claim is conditional on the job's state and lease, a webhook claim on the delivery's
claim time), so two for a moment is duplicated work, never a job run twice.

SQLite (the embedded default) is one process by design: it is always the leader.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

LEADER_LOCK_ID = 0x1F0A11C4
"""The advisory-lock key (a 64-bit int in Postgres' single-key form), fixed for this application."""

LEADER_RETRY_SECONDS = 2.0
"""How often a follower tries for the lock and a leader checks it still holds it (the take-over delay)."""


class Leadership:
    """``held()`` says whether this process is the leader now, re-checking at most every
    ``retry_seconds``. Thread-safe: the dispatcher and the webhook sender threads share one."""

    def __init__(
        self, database_url: str, retry_seconds: float = LEADER_RETRY_SECONDS, lock_id: int = LEADER_LOCK_ID
    ) -> None:
        self.always = not database_url.startswith("postgresql")
        self.retry_seconds = retry_seconds
        self.lock_id = lock_id
        self._engine: Engine | None = (
            None
            if self.always
            else create_engine(database_url, poolclass=NullPool, connect_args={"connect_timeout": 5})
        )
        self._conn: Connection | None = None
        self._held = self.always
        self._next = 0.0
        self._lock = threading.Lock()

    def held(self) -> bool:
        if self.always:
            return True
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                return self._held
            self._next = now + self.retry_seconds
            was = self._held
            try:
                self._held = self._check()
            except Exception as exc:  # database down or connection cut: the lock is gone with it
                log.warning("leader lock check failed: %s: %s", type(exc).__name__, exc)
                self._drop()
                self._held = False
            if self._held != was:
                state = "is now" if self._held else "is no longer"
                log.info("this API process %s the leader (dispatcher, reaper, webhooks)", state)
            return self._held

    def _check(self) -> bool:
        assert self._engine is not None
        if self._conn is None:
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        if self._held:
            # Still ours while this session lives; pg_locks confirms it was not lost some other way.
            query = text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                "AND granted AND ((classid::bigint << 32) | objid::bigint) = :key"
            )
            return bool(self._conn.execute(query, {"key": self.lock_id}).scalar())
        return bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.lock_id}).scalar())

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # already broken
                self._conn.close()
            self._conn = None

    def release(self) -> None:
        """Give the lock up (shutdown): closing the session releases it for a follower at once."""
        with self._lock:
            self._drop()
            self._held = self.always
            if self._engine is not None:
                self._engine.dispose()
