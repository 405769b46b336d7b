"""job lineage: a job may start from a fine-tuned model or checkpoint of an earlier job, or warm-start from one

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 06:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("base_model", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("parent_job_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("parent_checkpoint_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("from_checkpoint_id", sa.String(length=40), nullable=True))
        batch_op.create_foreign_key(batch_op.f("fk_jobs_parent_job_id_jobs"), "jobs", ["parent_job_id"], ["id"])
        batch_op.create_index(batch_op.f("ix_jobs_parent_job_id"), ["parent_job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_parent_job_id"))
        batch_op.drop_constraint(batch_op.f("fk_jobs_parent_job_id_jobs"), type_="foreignkey")
        batch_op.drop_column("from_checkpoint_id")
        batch_op.drop_column("parent_checkpoint_id")
        batch_op.drop_column("parent_job_id")
        batch_op.drop_column("base_model")
