"""All tables, imported here so ``Base.metadata`` is complete for Alembic and the app."""

from app.models.base import Base
from app.models.file import FileStatus, StoredFile
from app.models.job import Checkpoint, Job, JobEvent, JobStatus
from app.models.outbox import IdempotencyRecord, OutboxMessage
from app.models.tenancy import ApiKey, Project

__all__ = [
    "ApiKey",
    "Base",
    "Checkpoint",
    "FileStatus",
    "IdempotencyRecord",
    "Job",
    "JobEvent",
    "JobStatus",
    "OutboxMessage",
    "Project",
    "StoredFile",
]
