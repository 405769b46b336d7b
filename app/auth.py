"""API keys (``Authorization: Bearer ipo-sk-...``), the worker token for ``/internal/v1``, and the
dashboard's login sessions.

A key is shown once; the database keeps its first characters (for lookup) and a SHA-256 hash.
Keys are 256-bit random, so a fast hash is enough; comparison is constant-time. A dashboard session
id is 256-bit random too and stored only as its SHA-256 (looked up by that hash).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.errors import Unauthorized
from app.models import ApiKey, DashboardSession, Project
from app.models.base import new_id, utcnow

KEY_PREFIX = "ipo-sk-"
LOOKUP_CHARS = 16
SESSION_PREFIX = "ipo-ds-"
"""Dashboard session ids look like ``ipo-ds-<43 characters>``: never mistaken for an API key."""


@dataclass(frozen=True)
class Caller:
    project_id: str
    project_name: str
    key_id: str


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def get_or_create_project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(id=new_id("proj"), name=name, created_at=utcnow())
        session.add(project)
        session.flush()
    return project


def create_key(session: Session, project_name: str, name: str = "") -> tuple[ApiKey, str]:
    """Create an API key for the project (created if missing). Returns the row and the raw key (shown once)."""
    project = get_or_create_project(session, project_name)
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id("key"),
        project_id=project.id,
        name=name,
        prefix=raw[:LOOKUP_CHARS],
        key_hash=hash_key(raw),
        created_at=utcnow(),
    )
    session.add(key)
    session.flush()
    return key, raw


def authenticate(session: Session, authorization: str | None) -> Caller:
    raw = _bearer(authorization)
    if raw is None or not raw.startswith(KEY_PREFIX):
        raise Unauthorized("Missing or malformed API key. Send 'Authorization: Bearer ipo-sk-...'.")
    row = session.execute(
        select(ApiKey, Project.name)
        .join(Project, Project.id == ApiKey.project_id)
        .where(ApiKey.prefix == raw[:LOOKUP_CHARS])
    ).first()
    if row is None or row[0].revoked_at is not None or not hmac.compare_digest(row[0].key_hash, hash_key(raw)):
        raise Unauthorized("Incorrect or revoked API key.")
    key, project_name = row
    return Caller(project_id=key.project_id, project_name=project_name, key_id=key.id)


class KeyCache:
    """Recently authenticated API keys, so a busy key is looked up in the database about once per
    ``ttl_seconds`` instead of on every request.

    Staleness bound: a key revoked (``ipo keys revoke``, or any write to ``api_keys`` from another
    process) is refused by every API process at most ``ttl_seconds`` after the revocation commits; a key
    seen for the first time, or after its entry expired, is always checked against the database. Only
    successful lookups are kept (an unknown or revoked key goes to the database every time, as before), by
    the SHA-256 of the raw key (the raw key is not kept), at most ``max_entries`` of them (least recently
    used dropped first). ``ttl_seconds`` 0 disables the cache. ``clock`` is in seconds (tests pass a fake).
    Thread-safe: the gate calls it from the thread pool.
    """

    def __init__(
        self, ttl_seconds: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, Caller]] = OrderedDict()
        self._in_flight: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def cached(self, authorization: str | None) -> Caller | None:
        """The caller of ``authorization`` when a fresh entry holds it, else None (never blocks)."""
        raw = _bearer(authorization)
        if self.ttl_seconds <= 0 or raw is None or not raw.startswith(KEY_PREFIX):
            return None
        digest = hash_key(raw)
        with self._lock:
            hit = self._entries.get(digest)
            if hit is None or hit[0] <= self.clock():
                return None
            self._entries.move_to_end(digest)
            return hit[1]

    def authenticate(self, session_factory: Callable[[], Session], authorization: str | None) -> Caller:
        """The caller of ``authorization``: from the cache while fresh, else ``authenticate`` on a short
        session of ``session_factory`` (opened only on a miss; blocks). Raises ``Unauthorized`` like it.

        Single-flight: when a busy key's entry expires, the requests that arrive while it is looked up
        wait for that one lookup instead of each querying the database."""
        caller = self.cached(authorization)
        if caller is not None:
            return caller
        raw = _bearer(authorization)
        if self.ttl_seconds <= 0 or raw is None or not raw.startswith(KEY_PREFIX):
            with session_factory() as session:
                return authenticate(session, authorization)
        digest = hash_key(raw)
        with self._lock:
            flight = self._in_flight.setdefault(digest, threading.Lock())
        try:
            with flight:
                caller = self.cached(authorization)  # looked up by the request this one waited for
                if caller is not None:
                    return caller
                expires = self.clock() + self.ttl_seconds
                with session_factory() as session:
                    caller = authenticate(session, authorization)
                with self._lock:
                    self._entries[digest] = (expires, caller)
                    self._entries.move_to_end(digest)
                    while len(self._entries) > self.max_entries:
                        self._entries.popitem(last=False)
                return caller
        finally:
            with self._lock:
                if self._in_flight.get(digest) is flight and not flight.locked():
                    del self._in_flight[digest]

    def forget(self, key_id: str | None = None) -> None:
        """Drop the entries of ``key_id`` (every entry when None): this process refuses a key revoked here
        from its next request on."""
        with self._lock:
            if key_id is None:
                self._entries.clear()
                return
            for digest in [d for d, (_, c) in self._entries.items() if c.key_id == key_id]:
                del self._entries[digest]


def check_worker_token(expected: str, authorization: str | None) -> None:
    raw = _bearer(authorization)
    if raw is None or not hmac.compare_digest(raw.encode(), expected.encode()):
        raise Unauthorized("Missing or wrong worker token.", code="invalid_worker_token")


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def start_dashboard_session(session: Session, caller: Caller, lifetime_seconds: int) -> str:
    """Record a dashboard login of ``caller`` for ``lifetime_seconds``; returns the session id for the
    cookie (only its hash is stored). Expired sessions of every user are removed on the way."""
    now = utcnow()
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at <= now))
    raw = SESSION_PREFIX + secrets.token_urlsafe(32)
    session.add(
        DashboardSession(
            id_hash=hash_key(raw),
            project_id=caller.project_id,
            key_id=caller.key_id,
            created_at=now,
            expires_at=now + timedelta(seconds=lifetime_seconds),
        )
    )
    session.flush()
    return raw


def dashboard_caller(session: Session, raw: str) -> Caller:
    """The caller of a live dashboard session; ``Unauthorized`` when it is unknown, ended, expired, or its
    API key was revoked since."""
    if not raw.startswith(SESSION_PREFIX):
        raise Unauthorized("Not a dashboard session.")
    row = session.execute(
        select(ApiKey, Project.name)
        .join(DashboardSession, DashboardSession.key_id == ApiKey.id)
        .join(Project, Project.id == ApiKey.project_id)
        .where(DashboardSession.id_hash == hash_key(raw), DashboardSession.expires_at > utcnow())
    ).first()
    if row is None or row[0].revoked_at is not None:
        raise Unauthorized("The dashboard session has ended; log in again.")
    key, project_name = row
    return Caller(project_id=key.project_id, project_name=project_name, key_id=key.id)


def end_dashboard_session(session: Session, raw: str) -> None:
    """Logout: the session id stops working at once, wherever the cookie was copied to."""
    session.execute(delete(DashboardSession).where(DashboardSession.id_hash == hash_key(raw)))
