"""Engine and session factory. One request = one session, committed by the ``session`` dependency."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from app.models.job import lock_jobs_of_new_events
from app.models.outbox import notify_new_outbox_rows

PING_AFTER_IDLE_SECONDS = 1.0
"""A pooled connection that sat unused this long is pinged (``SELECT 1``) before it is handed out, so a
database restart or an idle timeout costs no request. One used more recently is handed out as is: a
busy API saves a round trip per request (bench/api_bench.py), and if the database went away in that
last second the request fails with a 503 and SQLAlchemy invalidates every older connection of the
pool, so the next request reconnects. (SQLAlchemy's ``pool_pre_ping`` pings on every checkout.)"""

_CHECKED_IN_AT = "ipo_checked_in_at"


def make_engine(url: str, pool_size: int = 20, ping_after_idle_seconds: float = PING_AFTER_IDLE_SECONDS) -> Engine:
    """The ledger's engine: Postgres with a pool of ``pool_size`` connections (no overflow, 10 s checkout
    timeout, 5 s connect timeout), or SQLite (WAL, foreign keys on, 30 s busy timeout). Connections idle
    at least ``ping_after_idle_seconds`` are pinged at checkout (``PING_AFTER_IDLE_SECONDS``)."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        # No overflow: an overflow connection is closed when it is returned to a full pool, so a busy API
        # opened (Postgres forks a backend) and closed one per request; a request waits for a pooled
        # connection instead (bench/api_bench.py profile).
        kwargs.update(pool_size=pool_size, max_overflow=0, pool_timeout=10)
        # A dead database must fail fast (503), not hang requests.
        kwargs["connect_args"] = {"connect_timeout": 5}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    _ping_idle_connections(engine, ping_after_idle_seconds)
    return engine


def _ping_idle_connections(engine: Engine, idle_seconds: float) -> None:
    """SQLAlchemy's pessimistic disconnect handling (a ``checkout`` listener raising
    ``DisconnectionError`` makes the pool replace the connection), for connections idle ``idle_seconds``."""
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info[_CHECKED_IN_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        checked_in_at = record.info.get(_CHECKED_IN_AT)
        if checked_in_at is None or time.monotonic() - checked_in_at < idle_seconds:
            return  # a brand-new connection, or one in use a moment ago
        try:
            dialect.do_ping(dbapi_conn)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, dbapi_conn, None):
                raise DisconnectionError(str(exc)) from exc
            raise


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while the dispatcher writes; foreign keys are off by default in SQLite.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """The sessions every part of the API uses: objects stay readable after commit, a job's event ids are
    handed out in commit order (``app.models.job.lock_jobs_of_new_events``), and a commit that wrote
    doorbells wakes the dispatcher wherever it runs (``app.models.outbox.notify_new_outbox_rows``)."""
    factory = sessionmaker(engine, expire_on_commit=False)
    event.listen(factory, "before_flush", lock_jobs_of_new_events)
    event.listen(factory, "before_flush", notify_new_outbox_rows)
    return factory


def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Yield a session; commit if the block succeeded, roll back otherwise."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
