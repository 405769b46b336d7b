"""Job events: OpenAI-style pages (newest first) and the oldest-first feed behind the SSE stream."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidRequest
from app.models import JobEvent


def parse_event_cursor(value: str | None, param: str = "after") -> int | None:
    if value is None or value == "":
        return None
    raw = value.removeprefix("ftevent-")
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidRequest(f"{param} must be an event id like 'ftevent-123'.", param=param)
    return int(raw)


def list_events(session: Session, job_id: str, *, after: str | None, limit: int) -> tuple[list[JobEvent], bool]:
    """Newest first; ``after`` = an event id, returns events older than it (OpenAI's order)."""
    cursor = parse_event_cursor(after)
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if cursor is not None:
        stmt = stmt.where(JobEvent.id < cursor)
    # (job_id, id): the order of the ix_job_events_job_id_id index (job_id is fixed, so it is id order).
    rows = list(session.scalars(stmt.order_by(JobEvent.job_id.desc(), JobEvent.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def events_since(session: Session, job_id: str, last_id: int | None, limit: int = 500) -> list[JobEvent]:
    """Oldest first, strictly after ``last_id`` (the SSE feed and ``Last-Event-ID`` replay)."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if last_id is not None:
        stmt = stmt.where(JobEvent.id > last_id)
    return list(session.scalars(stmt.order_by(JobEvent.job_id, JobEvent.id).limit(limit)))
