"""Transactional outbox: messages written with the state change, sent to the broker after commit."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from app.models.base import Base, JsonDoc, utcnow


class OutboxMessage(Base):
    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "sent_at", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(40))
    """``dispatch_job``: ring the Celery doorbell for a job."""
    payload: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(1000))


OUTBOX_CHANNEL = "ipo_outbox"
"""The Postgres NOTIFY channel of a commit that wrote outbox rows (``app.leader_loops.OutboxListener``)."""


def notify_new_outbox_rows(session: Session, _flush_context: Any, _instances: Any) -> None:
    """``before_flush`` hook (installed by ``app.db.make_sessionmaker``): on Postgres, a flush that inserts
    outbox rows also sends ``NOTIFY ipo_outbox``. Postgres delivers it at commit (never for a rollback) and
    once per transaction however many flushes sent it, so the leading dispatcher, in whichever process it
    runs, sends the doorbells at once instead of at its next interval."""
    if session.get_bind().dialect.name != "postgresql":
        return
    if any(isinstance(o, OutboxMessage) for o in session.new):
        session.connection().execute(select(func.pg_notify(OUTBOX_CHANNEL, "")))


class IdempotencyRecord(Base):
    """The first response to a POST with an ``Idempotency-Key``, replayed to retries for 24 hours."""

    __tablename__ = "idempotency_keys"

    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    """SHA-256 of method + path + body: another body under the same key is a 422."""
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
