"""All tables, imported here so ``Base.metadata`` is complete for Alembic and the app."""

from app.models.base import Base
from app.models.file import FileStatus, StoredFile
from app.models.job import Checkpoint, Job, JobEvent, JobStatus
from app.models.outbox import IdempotencyRecord, OutboxMessage
from app.models.tenancy import ApiKey, DashboardSession, Project
from app.models.webhook import DeliveryStatus, EndpointStatus, WebhookDelivery, WebhookEndpoint

__all__ = [
    "ApiKey",
    "Base",
    "Checkpoint",
    "DashboardSession",
    "DeliveryStatus",
    "EndpointStatus",
    "FileStatus",
    "IdempotencyRecord",
    "Job",
    "JobEvent",
    "JobStatus",
    "OutboxMessage",
    "Project",
    "StoredFile",
    "WebhookDelivery",
    "WebhookEndpoint",
]
