"""``/v1/models``: the allow-listed base models plus the caller project's fine-tuned models.

A fine-tuned model is the ``fine_tuned_model`` of one of the project's succeeded jobs. Deleting it marks
the job's model deleted (it no longer lists or resolves); the job, its events, checkpoints and result
files are kept. Base models belong to the installation and cannot be deleted through the API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import Forbidden, NotFound
from app.models import Job, JobStatus
from app.models.base import unix, utcnow
from app.services.models_registry import base_model_created, is_allowed, list_base_models
from contracts.model_info import ModelInfoError, describe_model

SYSTEM_OWNER = "system"


@dataclass(frozen=True)
class ModelEntry:
    id: str
    created: int
    owned_by: str
    description: dict[str, Any] = field(default_factory=dict)
    """``describe_model`` of the (base) model directory: architecture, parameters, context_length,
    chat_template; empty when the directory cannot be read."""


def _describe(models_dir: Path, base_model: str) -> dict[str, Any]:
    if not is_allowed(models_dir, base_model):
        return {}
    try:
        return describe_model(models_dir / base_model)
    except ModelInfoError:
        return {}


def _fine_tuned(session: Session, project_id: str, model_id: str | None = None) -> list[Job]:
    stmt = select(Job).where(
        Job.project_id == project_id,
        Job.status == JobStatus.SUCCEEDED.value,
        Job.fine_tuned_model.is_not(None),
        Job.fine_tuned_model_deleted_at.is_(None),
    )
    if model_id is not None:
        stmt = stmt.where(Job.fine_tuned_model == model_id)
    return list(session.scalars(stmt.order_by(Job.finished_at, Job.id)))


def _entry(job: Job, models_dir: Path) -> ModelEntry:
    return ModelEntry(
        id=job.fine_tuned_model or "",
        created=unix(job.finished_at or job.created_at) or 0,
        owned_by=job.project_id,
        description=_describe(models_dir, job.model),
    )


def _base_entry(models_dir: Path, name: str) -> ModelEntry:
    return ModelEntry(name, base_model_created(models_dir, name), SYSTEM_OWNER, _describe(models_dir, name))


def list_models(session: Session, project_id: str, models_dir: Path) -> list[ModelEntry]:
    base = [_base_entry(models_dir, name) for name in list_base_models(models_dir)]
    return base + [_entry(job, models_dir) for job in _fine_tuned(session, project_id)]


def _not_found(model_id: str) -> NotFound:
    return NotFound(f"The model '{model_id}' does not exist or you do not have access to it.", param="model")


def get_model(session: Session, project_id: str, models_dir: Path, model_id: str) -> ModelEntry:
    if is_allowed(models_dir, model_id):
        return _base_entry(models_dir, model_id)
    jobs = _fine_tuned(session, project_id, model_id)
    if not jobs:
        raise _not_found(model_id)
    return _entry(jobs[0], models_dir)


def delete_model(session: Session, project_id: str, models_dir: Path, model_id: str) -> str:
    if is_allowed(models_dir, model_id):
        raise Forbidden(
            f"'{model_id}' is a base model of this installation; only fine-tuned models can be deleted.",
            param="model",
            code="base_model_not_deletable",
        )
    result = session.execute(
        update(Job)
        .where(
            Job.project_id == project_id,
            Job.status == JobStatus.SUCCEEDED.value,
            Job.fine_tuned_model == model_id,
            Job.fine_tuned_model_deleted_at.is_(None),
        )
        .values(fine_tuned_model_deleted_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        raise _not_found(model_id)
    return model_id
