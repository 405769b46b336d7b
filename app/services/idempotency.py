"""``Idempotency-Key`` on every POST: the same key and body replays the first response; another body
under the same key is a 422; the same key while the first request is still running is a 409.

The key is reserved in its own committed transaction (so a concurrent retry sees it), and the
response is recorded in the request's own transaction (so "job created" and "key answered" commit
together). Keys are scoped per project and kept for 24 hours.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import Conflict, IdempotencyMismatch
from app.models import IdempotencyRecord
from app.models.base import as_utc, utcnow

RETENTION = timedelta(hours=24)
IN_FLIGHT_TIMEOUT = timedelta(seconds=120)
"""An in-flight key older than this belongs to a request that died; a retry may take it over."""


def request_fingerprint(method: str, path: str, body: Any) -> str:
    """SHA-256 (hex) of the request's method, path and canonical JSON body: what a replay must match."""
    raw = json.dumps([method, path, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()


def reserve(sessions: sessionmaker[Session], project_id: str, key: str, fingerprint: str) -> IdempotencyRecord | None:
    """Reserve ``key``. Returns the finished record to replay, or None when this request should run."""
    for _ in range(3):
        with sessions() as session:
            try:
                session.add(
                    IdempotencyRecord(project_id=project_id, key=key, fingerprint=fingerprint, created_at=utcnow())
                )
                session.commit()
                return None
            except IntegrityError:
                session.rollback()
            row = session.get(IdempotencyRecord, (project_id, key))
            if row is None:
                continue
            now = utcnow()
            if as_utc(row.created_at) < now - RETENTION:
                session.delete(row)
                session.commit()
                continue
            if row.fingerprint != fingerprint:
                raise IdempotencyMismatch(
                    "This Idempotency-Key was already used with a different request body.", param="Idempotency-Key"
                )
            if row.response_status is not None:
                return row
            if as_utc(row.created_at) < now - IN_FLIGHT_TIMEOUT:
                row.created_at = now
                session.commit()
                return None
            raise Conflict(
                "A request with this Idempotency-Key is still in progress.",
                param="Idempotency-Key",
                code="idempotency_key_in_use",
                retryable=True,  # the first request will answer soon; the SDK's retry then gets its replay
            )
    raise Conflict(
        "Could not reserve the Idempotency-Key; retry.",
        param="Idempotency-Key",
        code="idempotency_key_in_use",
        retryable=True,
    )


def record(session: Session, project_id: str, key: str, status: int, body: dict[str, Any]) -> None:
    row = session.get(IdempotencyRecord, (project_id, key))
    if row is not None:
        row.response_status = status
        row.response_body = body
        row.completed_at = utcnow()


def release(sessions: sessionmaker[Session], project_id: str, key: str) -> None:
    """The request failed before answering: free the key so a retry runs it again."""
    with sessions() as session:
        session.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.project_id == project_id,
                IdempotencyRecord.key == key,
                IdempotencyRecord.response_status.is_(None),
            )
        )
        session.commit()


def purge_expired(session: Session) -> int:
    result = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < utcnow() - RETENTION))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def replay_headers() -> dict[str, str]:
    return {"Idempotent-Replayed": "true"}


__all__ = ["purge_expired", "record", "release", "replay_headers", "request_fingerprint", "reserve", "select"]
