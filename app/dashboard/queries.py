"""The few reads the dashboard needs beyond the API's services: the job list filtered by status (with a
count per status for the filter bar) and one checkpoint of a job. Tenancy as everywhere: the job is
looked up through ``jobs_service.get_job``, so another project's ids are a 404."""

from __future__ import annotations

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.models import Checkpoint, Job, JobStatus
from app.services import jobs as jobs_service


def list_jobs_page(
    session: Session, project_id: str, *, status: JobStatus | None, after: str | None, limit: int
) -> tuple[list[Job], bool]:
    """Newest first, keyset-paginated on (created_at, id) like ``GET /v1/fine_tuning/jobs``."""
    stmt = select(Job).where(Job.project_id == project_id)
    if status is not None:
        stmt = stmt.where(Job.status == status.value)
    if after:
        cursor = jobs_service.get_job(session, project_id, after)
        stmt = stmt.where(
            or_(Job.created_at < cursor.created_at, and_(Job.created_at == cursor.created_at, Job.id < cursor.id))
        )
    rows = list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def count_by_status(session: Session, project_id: str) -> dict[str, int]:
    rows = session.execute(
        select(Job.status, func.count()).where(Job.project_id == project_id).group_by(Job.status)
    ).all()
    return {str(status): int(n) for status, n in rows}


def get_checkpoint(session: Session, project_id: str, job_id: str, checkpoint_id: str) -> Checkpoint:
    job = jobs_service.get_job(session, project_id, job_id)
    row = session.scalar(select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job.id))
    if row is None:
        raise NotFound(f"No such checkpoint: {checkpoint_id}", param="checkpoint_id")
    return row
