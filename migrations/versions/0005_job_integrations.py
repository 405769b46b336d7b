"""jobs.integrations: the experiment trackers (W&B, MLflow) a job's run is logged to

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 06:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: existing jobs had no integrations (the API echoes null/absent as []).
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("integrations", sa.JSON().with_variant(postgresql.JSONB(), "postgresql")))


def downgrade() -> None:
    # The older code never reads the column: jobs created with integrations keep running, untracked.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("integrations")
