"""jobs.redispatch_at: when the redispatch sweep rings an unclaimed job's doorbell again

The sweep used to re-send every job queued longer than ``IPO_REDISPATCH_AFTER_SECONDS`` since its last
doorbell, once a minute for as long as it waited, and read every unsent outbox row on each pass to skip
the ones already pending: with thousands of jobs queued behind busy workers it flooded the broker and
kept the API's leader busy. Now the time of the next ring is stored when a doorbell is sent, backing off
with the job's time in queue (``app.services.dispatch.next_redispatch``), and one indexed range query finds
the jobs due.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 15:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("redispatch_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_jobs_status_redispatch", ["status", "redispatch_at"], unique=False)
    # Jobs queued now whose doorbell was sent and none is pending: due at once (as the old sweep had them),
    # so an upgrade never strands a job whose message was lost.
    op.execute(
        "UPDATE jobs SET redispatch_at = dispatched_at WHERE status = 'queued' AND lease_token IS NULL "
        "AND dispatched_at IS NOT NULL"
    )


def downgrade() -> None:
    # The older sweep works from dispatched_at alone.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_status_redispatch")
        batch_op.drop_column("redispatch_at")
