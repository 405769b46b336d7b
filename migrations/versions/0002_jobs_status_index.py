"""index jobs by (project, status, created_at, id) for the dashboard's status filter

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 17:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_project_status_created", "jobs", ["project_id", "status", "created_at", "id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_project_status_created", table_name="jobs")
