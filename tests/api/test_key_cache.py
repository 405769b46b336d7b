"""``app.auth.KeyCache``: a busy key is looked up once per TTL, a revoked key is refused once its entry
expires (the documented staleness bound), unknown keys are never cached; on the real database, with a
fake clock (no sleeping, no timing assertions)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, update

from app.auth import KeyCache, create_key
from app.db import make_engine, make_sessionmaker
from app.errors import Unauthorized
from app.models import ApiKey
from app.models.base import utcnow
from app.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.resolved_database_url)
    yield engine
    engine.dispose()


def _count_key_lookups(engine: Engine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM api_keys" in statement:
            seen.append(statement)

    return seen


def _new_key(engine: Engine, project: str) -> tuple[str, str]:
    with make_sessionmaker(engine)() as session, session.begin():
        row, raw = create_key(session, project)
        return row.id, raw


def _revoke(engine: Engine, key_id: str) -> None:
    with make_sessionmaker(engine)() as session, session.begin():
        session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))


def test_a_key_is_looked_up_once_per_ttl_and_a_revocation_is_seen_when_the_entry_expires(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    key_id, raw = _new_key(engine, "cache-a")
    clock = Clock()
    cache = KeyCache(2.0, clock=clock)
    lookups = _count_key_lookups(engine)

    first = cache.authenticate(sessions, f"Bearer {raw}")
    assert first.key_id == key_id and len(lookups) == 1
    for _ in range(5):
        assert cache.authenticate(sessions, f"Bearer {raw}") == first
        assert cache.cached(f"Bearer {raw}") == first
    assert len(lookups) == 1  # answered from the cache

    _revoke(engine, key_id)
    clock.now += 1.9  # within the bound the entry still answers (what IPO_API_KEY_CACHE_SECONDS allows)
    assert cache.authenticate(sessions, f"Bearer {raw}") == first
    clock.now += 0.2  # past it: looked up again, and refused
    assert cache.cached(f"Bearer {raw}") is None
    with pytest.raises(Unauthorized, match="revoked"):
        cache.authenticate(sessions, f"Bearer {raw}")
    with pytest.raises(Unauthorized):  # and refused every time after: a refusal is never cached
        cache.authenticate(sessions, f"Bearer {raw}")
    assert len(lookups) == 3


def test_unknown_and_malformed_keys_go_to_the_database_every_time(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    cache = KeyCache(60.0, clock=Clock())
    lookups = _count_key_lookups(engine)
    for _ in range(3):
        with pytest.raises(Unauthorized, match="Incorrect or revoked"):
            cache.authenticate(sessions, "Bearer ipo-sk-" + "x" * 43)
    assert len(lookups) == 3
    for header in (None, "", "Bearer", "Basic abc", "Bearer not-a-key"):
        assert cache.cached(header) is None
        with pytest.raises(Unauthorized, match="Missing or malformed"):
            cache.authenticate(sessions, header)


def test_forget_drops_a_key_at_once_and_ttl_zero_disables_the_cache(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    key_id, raw = _new_key(engine, "cache-b")
    other_id, other = _new_key(engine, "cache-c")
    lookups = _count_key_lookups(engine)
    cache = KeyCache(60.0, clock=Clock())
    cache.authenticate(sessions, f"Bearer {raw}")
    cache.authenticate(sessions, f"Bearer {other}")
    _revoke(engine, key_id)
    cache.forget(key_id)
    with pytest.raises(Unauthorized):
        cache.authenticate(sessions, f"Bearer {raw}")
    assert cache.authenticate(sessions, f"Bearer {other}").key_id == other_id  # still cached
    assert len(lookups) == 3

    off = KeyCache(0.0)
    for _ in range(3):
        assert off.authenticate(sessions, f"Bearer {other}").key_id == other_id
        assert off.cached(f"Bearer {other}") is None
    assert len(lookups) == 6


def test_the_cache_keeps_at_most_max_entries(engine: Engine) -> None:
    sessions = make_sessionmaker(engine)
    keys = [_new_key(engine, f"cache-many-{i}")[1] for i in range(4)]
    cache = KeyCache(60.0, max_entries=2, clock=Clock())
    for raw in keys:
        cache.authenticate(sessions, f"Bearer {raw}")
    assert [cache.cached(f"Bearer {raw}") is not None for raw in keys] == [False, False, True, True]


def test_the_gate_refuses_a_key_revoked_elsewhere_once_the_ttl_has_passed(
    client: TestClient, auth: dict[str, str], engine: Engine
) -> None:
    ctx = client.app.state.ctx  # type: ignore[attr-defined]
    assert ctx.key_cache.ttl_seconds == Settings.model_fields["api_key_cache_seconds"].default
    clock = Clock()
    ctx.key_cache.clock = clock
    assert client.get("/v1/fine_tuning/jobs", headers=auth).status_code == 200
    key_id = ctx.key_cache.cached(auth["Authorization"]).key_id
    _revoke(engine, key_id)  # as `ipo keys revoke` does, from another connection
    clock.now += ctx.key_cache.ttl_seconds + 0.001
    r = client.get("/v1/fine_tuning/jobs", headers=auth)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_concurrent_misses_of_one_key_share_one_lookup(engine: Engine) -> None:
    """The first request of a burst looks the key up (held open here until the others have arrived); the
    rest wait for it and take its answer: one query, whatever the order the threads run in."""
    import threading

    sessions = make_sessionmaker(engine)
    key_id, raw = _new_key(engine, "cache-burst")
    lookups = _count_key_lookups(engine)
    release = threading.Event()

    def slow_sessions() -> Any:
        release.wait(timeout=30)
        return sessions()

    cache = KeyCache(60.0, clock=Clock())
    answers: list[str] = []
    threads = [
        threading.Thread(target=lambda: answers.append(cache.authenticate(slow_sessions, f"Bearer {raw}").key_id))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    threading.Timer(0.5, release.set).start()
    for t in threads:
        t.join(timeout=60)
    assert answers == [key_id] * 8
    assert len(lookups) == 1
