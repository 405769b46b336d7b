"""``app.db.make_engine``'s pool: a connection idle past ``ping_after_idle_seconds`` is pinged at checkout
and replaced when its server side is gone; a connection used a moment ago is handed out without a ping;
a dead connection that was not pinged fails its request once, and the pool reconnects for the next."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import OperationalError

from app.db import make_engine


def _statements(engine: Engine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine, "checkout")
    def _mark(*_: Any) -> None:
        seen.append("<checkout>")

    return seen


def _pings(engine: Engine, sink: list[str]) -> None:
    original = engine.dialect.do_ping

    def counted(dbapi_conn: Any) -> bool:
        sink.append("<ping>")
        return original(dbapi_conn)

    engine.dialect.do_ping = counted  # type: ignore[method-assign,assignment]


def _kill_backends(database_url: str, pids: list[int]) -> None:
    admin = make_engine(database_url)
    with admin.begin() as conn:
        for pid in pids:
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    admin.dispose()


@pytest.fixture
def postgres_url(database_url: str) -> str:
    if not database_url.startswith("postgresql"):
        pytest.skip("needs Postgres (TEST_DATABASE_URL) to kill a server-side connection")
    return database_url


def test_idle_connections_are_pinged_and_replaced_busy_ones_are_not_pinged(postgres_url: str) -> None:
    idle = make_engine(postgres_url, pool_size=1, ping_after_idle_seconds=0.0)  # every reuse counts as idle
    busy = make_engine(postgres_url, pool_size=1, ping_after_idle_seconds=3600.0)  # never idle long enough
    try:
        for engine in (idle, busy):
            events = _statements(engine)
            _pings(engine, events)
            with engine.connect() as conn:
                pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            # the first checkout is a brand-new connection: never pinged
            assert events.count("<checkout>") == 2
            assert events.count("<ping>") == (1 if engine is idle else 0)
            _kill_backends(postgres_url, [pid])
            if engine is idle:  # pinged, found dead, replaced: the caller never sees it
                with engine.connect() as conn:
                    assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
            else:  # not pinged: this use fails (the API answers 503) and the pool reconnects for the next
                with pytest.raises(OperationalError), engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                with engine.connect() as conn:
                    assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        idle.dispose()
        busy.dispose()
