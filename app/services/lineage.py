"""A job's starting point: a base model, or a fine-tuned model (or checkpoint) of one of the project's jobs.

OpenAI fine-tunes a fine-tuned model when ``model`` names one; here ``model`` may be

- an allow-listed base model (``tiny-mistral``),
- the ``fine_tuned_model`` of one of the caller's succeeded jobs (``ft:tiny-mistral:sft:ftjob-...``),
- a checkpoint, by its id (``ftckpt-...``) or by OpenAI's ``fine_tuned_model_checkpoint`` name
  (``ft:...:ftjob-...:ckpt-step-N``), of one of the caller's jobs that is no longer running.

The new job trains a new LoRA adapter on the base with the whole chain of earlier adapters merged in
(``parent_chain``: root first, what the worker merges, ``worker/training/loading.py``); for IPO/DPO that
merged model is the reference. Another project's model or checkpoint is a 404, like one that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidRequest, NotFound
from app.models import Checkpoint, Job, JobStatus
from app.services.models_registry import is_allowed, list_base_models
from contracts.internal import ParentAdapter

MAX_DEPTH = 16
"""Longest lineage accepted (each level is one more adapter merged before training)."""
CHECKPOINT_MARK = ":ckpt-step-"


@dataclass(frozen=True)
class Start:
    base_model: str
    parent: Job | None = None
    checkpoint: Checkpoint | None = None


def resolve_start(session: Session, project_id: str, model: str, models_dir: Path) -> Start:
    """Where a new job starts. Raises ``NotFound`` (404, ``model_not_found``) for an unknown or foreign
    fine-tuned model or checkpoint, ``InvalidRequest`` (400) for a base model that is not installed, a
    parent still running, a parent whose base model is no longer installed, or a lineage over ``MAX_DEPTH``."""
    if is_allowed(models_dir, model):
        return Start(base_model=model)
    if model.startswith("ftckpt-") or CHECKPOINT_MARK in model:
        checkpoint, parent = _checkpoint(session, project_id, model)
        if JobStatus(parent.status) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
            raise InvalidRequest(
                f"Checkpoint {model!r} belongs to job {parent.id}, which is still {parent.status}: a job can start "
                "from a checkpoint of a succeeded, failed or cancelled job only.",
                param="model",
                code="parent_not_finished",
            )
    elif model.startswith("ft:"):
        found = session.scalar(
            select(Job).where(
                Job.project_id == project_id,
                Job.fine_tuned_model == model,
                Job.fine_tuned_model_deleted_at.is_(None),
            )
        )
        if found is None:
            raise NotFound(f"The model {model!r} does not exist.", param="model", code="model_not_found")
        parent, checkpoint = found, None
    else:
        available = ", ".join(list_base_models(models_dir)) or "none installed"
        raise InvalidRequest(
            f"Model {model!r} is not available. Available base models: {available}; or the fine_tuned_model "
            "of one of your jobs, or a checkpoint id.",
            param="model",
            code="model_not_found",
        )
    base = parent.base_model or parent.model
    if not is_allowed(models_dir, base):
        raise InvalidRequest(
            f"Model {model!r} was trained on base model {base!r}, which is not installed on this server.",
            param="model",
            code="incompatible_base_model",
        )
    depth = len(parent_chain(session, parent, checkpoint))
    if depth > MAX_DEPTH:
        raise InvalidRequest(
            f"Model {model!r} already stacks {depth - 1} adapters; at most {MAX_DEPTH} are merged before training.",
            param="model",
        )
    return Start(base_model=base, parent=parent, checkpoint=checkpoint)


def _checkpoint(session: Session, project_id: str, model: str) -> tuple[Checkpoint, Job]:
    missing = NotFound(f"The checkpoint {model!r} does not exist.", param="model", code="model_not_found")
    if model.startswith("ftckpt-"):
        checkpoint = session.scalar(
            select(Checkpoint).where(Checkpoint.id == model, Checkpoint.project_id == project_id)
        )
    else:
        prefix, _, step = model.rpartition(CHECKPOINT_MARK)
        job_id = prefix.rpartition(":")[2]
        if not step.isdigit() or not job_id.startswith("ftjob-"):
            raise missing
        checkpoint = session.scalar(
            select(Checkpoint)
            .where(Checkpoint.job_id == job_id, Checkpoint.project_id == project_id, Checkpoint.step == int(step))
            .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
            .limit(1)
        )
    if checkpoint is None:
        raise missing
    parent = session.get(Job, checkpoint.job_id)
    if parent is None or parent.project_id != project_id:
        raise missing
    return checkpoint, parent


def parent_chain(session: Session, parent: Job | None, checkpoint: Checkpoint | None) -> list[ParentAdapter]:
    """The adapters to merge into the base, root first: the starting point's, then its own parent's, up to a
    job on a base model. A final adapter is the parent's first result file (``finish``); a checkpoint is its
    archive (the adapter weights are at its top level)."""
    chain: list[ParentAdapter] = []
    while parent is not None and len(chain) <= MAX_DEPTH:
        if checkpoint is not None:
            file_id = checkpoint.file_id
        elif parent.result_files:
            file_id = parent.result_files[0]
        else:  # a fine_tuned_model is only set with its adapter file: an old or damaged row
            raise InvalidRequest(f"Job {parent.id} has no adapter file to start from.", param="model")
        chain.append(
            ParentAdapter(
                job_id=parent.id,
                checkpoint_id=checkpoint.id if checkpoint is not None else None,
                download_path=f"/internal/v1/files/{file_id}/content",
            )
        )
        checkpoint = session.get(Checkpoint, parent.parent_checkpoint_id) if parent.parent_checkpoint_id else None
        parent = session.get(Job, parent.parent_job_id) if parent.parent_job_id else None
    return chain[::-1]


@dataclass(frozen=True)
class WarmStart:
    checkpoint: Checkpoint
    job: Job
    """The checkpoint's job: the new job keeps its model, base and lineage (so the same reference)."""


def resolve_warm_start(session: Session, project_id: str, ref: str, *, model: str, method_type: str) -> WarmStart:
    """``from_checkpoint`` (Together's name): a checkpoint, by id or ``fine_tuned_model_checkpoint`` name, of one
    of the caller's jobs. Raises ``NotFound`` (404) for an unknown or foreign checkpoint, ``InvalidRequest`` (400,
    ``param="from_checkpoint"``) when its job is still active, used another method, or another ``model``."""
    if not (ref.startswith("ftckpt-") or CHECKPOINT_MARK in ref):
        raise InvalidRequest(
            f"from_checkpoint {ref!r} is not a checkpoint id (ftckpt-...) or fine_tuned_model_checkpoint name.",
            param="from_checkpoint",
        )
    try:
        checkpoint, job = _checkpoint(session, project_id, ref)
    except NotFound as exc:
        raise NotFound(exc.message, param="from_checkpoint", code="checkpoint_not_found") from exc
    if JobStatus(job.status) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
        raise InvalidRequest(
            f"from_checkpoint {ref!r} belongs to job {job.id}, which is still {job.status}: warm starts use a "
            "checkpoint of a succeeded, failed or cancelled job (pause and resume continue a running one).",
            param="from_checkpoint",
            code="parent_not_finished",
        )
    parent_type = str(job.method.get("type", "ipo"))
    if parent_type != method_type:
        raise InvalidRequest(
            f"from_checkpoint {ref!r} is a {parent_type} checkpoint (job {job.id}); a warm start continues the same "
            f"method, not {method_type}. To train {method_type} on top of it, pass it as model instead.",
            param="from_checkpoint",
            code="incompatible_checkpoint",
        )
    if model != job.model:
        raise InvalidRequest(
            f"from_checkpoint {ref!r} continues job {job.id}, trained on model {job.model!r}; model must be the "
            f"same (got {model!r}).",
            param="model",
            code="incompatible_checkpoint",
        )
    return WarmStart(checkpoint=checkpoint, job=job)


def warm_start_adapter(session: Session, checkpoint_id: str | None) -> ParentAdapter | None:
    """The claim's ``warm_start`` for a job's ``from_checkpoint_id`` (None without one)."""
    checkpoint = session.get(Checkpoint, checkpoint_id) if checkpoint_id else None
    if checkpoint is None:
        return None
    return ParentAdapter(
        job_id=checkpoint.job_id,
        checkpoint_id=checkpoint.id,
        download_path=f"/internal/v1/files/{checkpoint.file_id}/content",
    )
