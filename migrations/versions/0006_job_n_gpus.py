"""jobs.n_gpus: how many devices a job trains on at once (one process each, accelerate launch)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 08:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NOT NULL with a server default: every existing job trained on one device.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("n_gpus", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    # The older code never reads the column; a queued multi-device job would then run on one device.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("n_gpus")
