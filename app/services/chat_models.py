"""Which model a chat completion asks for, and the adapter directory the inference server loads for it.

``model`` may be an allow-listed base model (``tiny-mistral``), the ``fine_tuned_model`` of one of the
caller's succeeded jobs (``ft:tiny-mistral:ipo:ftjob-...``) or the ``fine_tuned_model_checkpoint`` of one
of its checkpoints (``ft:...:ftjob-...:ckpt-step-20``), including checkpoints of a job still running.
Anything else, another project's model included, is a 404 exactly like an id that does not exist.

Adapters reach the inference server as directories: the stored zip (the job's adapter result file, or
the checkpoint archive) is unpacked once under ``IPO_ADAPTERS_DIR/<name>`` with the zip-slip-safe
``contracts.archive.unzip_safe``. ``<name>`` is the job id or checkpoint id, which is also the adapter's
name on the inference server (ids are unique; the public model names of two attempts' checkpoints at the
same step are not).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidRequest
from app.models import Checkpoint, Job, JobStatus, StoredFile
from app.services.model_catalog import _not_found
from app.services.models_registry import is_allowed
from app.storage import Storage
from contracts.archive import unzip_safe

_CHECKPOINT = re.compile(r"^(?P<base>.+:(?P<job>ftjob-[A-Za-z0-9_-]+)):ckpt-step-(?P<step>[0-9]{1,9})$")


@dataclass(frozen=True)
class ChatTarget:
    """A resolved ``model``: its public id, the base model it runs on, its name on the inference server,
    and for an adapter the storage key of its archive to unpack (``None`` for a base model)."""

    public_id: str
    base_model: str
    served_name: str
    archive: str | None = None


def resolve(session: Session, project_id: str, models_dir: Path, storage: Storage, model_id: str) -> ChatTarget:
    """The ``ChatTarget`` of ``model_id`` for the caller's project. Raises ``NotFound`` (param ``model``)."""
    if is_allowed(models_dir, model_id):
        return ChatTarget(model_id, model_id, model_id)
    if (m := _CHECKPOINT.match(model_id)) is not None:
        job = session.get(Job, m["job"])
        if job is None or job.project_id != project_id or job.fine_tuned_model_deleted_at is not None:
            raise _not_found(model_id)
        if m["base"] != (job.fine_tuned_model or f"ft:{job.model}:{job.suffix or 'ipo'}:{job.id}"):
            raise _not_found(model_id)
        checkpoint = session.scalars(
            select(Checkpoint)
            .where(Checkpoint.job_id == job.id, Checkpoint.step == int(m["step"]))
            .order_by(Checkpoint.attempt.desc())
            .limit(1)
        ).first()
        if checkpoint is None:
            raise _not_found(model_id)
        _refuse_chain(job, model_id)
        return ChatTarget(model_id, job.model, checkpoint.id, _archive(session, storage, checkpoint.file_id))
    job = session.scalars(
        select(Job).where(
            Job.project_id == project_id,
            Job.fine_tuned_model == model_id,
            Job.status == JobStatus.SUCCEEDED.value,
            Job.fine_tuned_model_deleted_at.is_(None),
        )
    ).first()
    if job is None or not job.result_files:
        raise _not_found(model_id)
    _refuse_chain(job, model_id)
    return ChatTarget(model_id, job.model, job.id, _archive(session, storage, job.result_files[0]))


def _refuse_chain(job: Job, model_id: str) -> None:
    """A job trained on top of another fine-tuned model has an adapter for base + its parents merged: it
    cannot be served as one LoRA adapter on the base model (neither here nor by vLLM)."""
    if job.parent_job_id is not None:
        raise InvalidRequest(
            f"'{model_id}' was fine-tuned from another fine-tuned model; chat completions serve one LoRA adapter "
            "on a base model, not a chain. Download it merged (ipo jobs download --merged) and serve that.",
            param="model",
            code="model_not_served",
        )


def _archive(session: Session, storage: Storage, file_id: str) -> str:
    row = session.get(StoredFile, file_id)
    if row is None:  # recorded only once stored; a missing row is a broken ledger, not a user error
        raise RuntimeError(f"stored file {file_id} is missing")
    return row.storage_key


def unpacked(target: ChatTarget, adapters_dir: Path, storage: Storage) -> Path:
    """The adapter directory of ``target`` under ``adapters_dir``, unpacked from its archive in ``storage``
    on first use (a local copy first when the store is remote; a concurrent unpack of the same archive by
    another API process is harmless: one rename wins)."""
    assert target.archive is not None
    dest = adapters_dir / target.served_name
    if (dest / "adapter_config.json").is_file():
        return dest
    with contextlib.suppress(FileExistsError), storage.local_copy(target.archive) as archive:
        unzip_safe(archive, dest)
    return dest
