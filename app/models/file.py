"""Uploaded files (training data) and result files (adapters, metrics) kept in the artifact store."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, JsonDoc, utcnow


class FileStatus:
    UPLOADED = "uploaded"
    PROCESSED = "processed"
    ERROR = "error"


class StoredFile(Base):
    __tablename__ = "files"
    __table_args__ = (Index("ix_files_project_created", "project_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(40))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(400))
    status: Mapped[str] = mapped_column(String(20), default=FileStatus.UPLOADED)
    status_details: Mapped[str | None] = mapped_column(String(4000))
    n_examples: Mapped[int | None] = mapped_column(Integer)
    data_format: Mapped[str | None] = mapped_column(String(40))
    validation: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Set by ``DELETE /v1/files/{id}``: the row stays (jobs and checkpoints reference it), the blob goes."""
