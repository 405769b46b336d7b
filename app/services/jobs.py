"""Fine-tuning jobs: create (with its outbox row, one transaction), read, list, and user transitions.

Every status change is one conditional UPDATE naming the states it expects; when it matches no row
the caller gets a 409 that says why, never a silent overwrite.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, tuple_, update
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidRequest, NotFound, RateLimited, describe_validation_errors
from app.models import Checkpoint, FileStatus, Job, JobEvent, JobStatus, OutboxMessage, Project, StoredFile
from app.models.base import new_id, utcnow
from app.schemas.requests import JobCreate
from app.services import files as files_service
from app.services import metrics, webhooks
from app.services.lineage import Start, resolve_start, resolve_warm_start
from app.services.models_registry import is_allowed
from app.services.prompt_lengths import (
    identical_after_truncation,
    longest_prompt,
    measure_file,
    measure_untrusted,
    tokenizer_for,
)
from app.services.sft_lengths import check_supervised_file, measure_supervised_file
from app.storage import Storage
from contracts.chat_templates import (
    ChatTemplateChoice,
    ChatTemplateError,
    describe_template_refusals,
    resolve_chat_template,
)
from contracts.integrations import MlflowBlock, WandbBlock, dump_integrations, tracking_uri_allowed
from contracts.max_length import MaxLengthError, resolve_max_length
from contracts.method import PREFERENCE_ONLY, Method
from contracts.model_info import ModelInfoError, read_config, unknown_target_modules
from contracts.pair_tokens import describe_left_out
from contracts.sft_formats import SUPERVISED_FORMATS

ACTIVE = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED)
ACTIVE_JOBS_RETRY_AFTER = 30
"""``Retry-After`` of the too-many-active-jobs 429: jobs take minutes, so polling faster is pointless."""
METADATA_SCAN_BATCH = 200
"""Rows read per round while filtering a job list by metadata."""


def add_event(
    session: Session,
    job: Job,
    message: str,
    *,
    level: str = "info",
    type_: str = "message",
    data: dict[str, Any] | None = None,
    attempt: int | None = None,
    seq: int | None = None,
) -> JobEvent:
    event = JobEvent(
        job_id=job.id,
        project_id=job.project_id,
        attempt=attempt,
        seq=seq,
        type=type_,
        level=level,
        message=message,
        data=data,
        created_at=utcnow(),
    )
    session.add(event)
    session.info.setdefault(EVENTS_WRITTEN, set()).add(job.id)
    return event


EVENTS_WRITTEN = "ipo.events_written"
"""Session.info: ids of jobs that got events; the request dependency wakes their live feeds after commit."""
OUTBOX_WRITTEN = "ipo.outbox_written"
"""Session.info flag: the request dependency wakes the dispatcher after committing such a session."""


def enqueue_dispatch(session: Session, job: Job) -> None:
    """Write the doorbell into the outbox; the dispatcher sends it after this transaction commits."""
    session.info[OUTBOX_WRITTEN] = True
    session.add(
        OutboxMessage(project_id=job.project_id, kind="dispatch_job", payload={"job_id": job.id}, created_at=utcnow())
    )


def _merge_legacy_hyperparameters(body: JobCreate) -> Method:
    """OpenAI's deprecated top-level ``hyperparameters`` merged under ``method`` (whose own values win),
    validated like them; an error names ``hyperparameters.<field>``."""
    method = body.method
    if not body.hyperparameters:
        return method
    params = method.params()
    merged = {**body.hyperparameters, **params.hyperparameters.model_dump(exclude_defaults=True)}
    data = method.model_dump()
    data[method.type] = {**params.model_dump(), "hyperparameters": merged}
    try:
        return Method.model_validate(data)
    except ValidationError as exc:
        inside = (method.type, "hyperparameters")
        errors = [
            {**e, "loc": ("hyperparameters", *e["loc"][2:])} if tuple(e["loc"][:2]) == inside else e
            for e in exc.errors()
        ]
        param, message = describe_validation_errors(errors)
        raise InvalidRequest(message, param=param or "hyperparameters", code="invalid_value") from exc


def _usable_file(session: Session, project_id: str, file_id: str, param: str) -> StoredFile:
    # Share-locked (Postgres) so a concurrent DELETE of the file waits for this job, then sees it and refuses.
    row = files_service.get_file(session, project_id, file_id, param=param, for_share=True)
    if row.purpose != "fine-tune":
        raise InvalidRequest(f"{file_id} has purpose {row.purpose!r}, expected 'fine-tune'.", param=param)
    if row.status == FileStatus.ERROR:
        kind = "supervised" if row.data_format in SUPERVISED_FORMATS else "preference"
        raise InvalidRequest(
            f"{param} {file_id} is not valid {kind} data: {row.status_details}",
            param=param,
            code="invalid_training_file",
        )
    return row


def check_method_fits_data(method: Method, data_files: dict[str, StoredFile]) -> None:
    """Refuse a supervised job on preference pairs and a preference job on conversations (the file's
    format was recognised at upload), and preference-only hyperparameters on a supervised job."""
    prefix = f"method.{method.type}.hyperparameters"
    hp = method.params().hyperparameters
    for name in () if method.is_preference else PREFERENCE_ONLY:
        if getattr(hp, name) != "auto":
            raise InvalidRequest(
                f"{name} applies to preference methods (ipo, dpo), not to supervised fine-tuning.",
                param=f"{prefix}.{name}",
            )
    for param, row in data_files.items():
        if row.data_format is None:
            continue
        supervised_file = row.data_format in SUPERVISED_FORMATS
        if supervised_file == method.is_preference:
            kind, wanted = ("supervised", "preference pairs") if supervised_file else ("preference", "conversations")
            raise InvalidRequest(
                f"{param} {row.id} holds {kind} data (format {row.data_format!r}), but method.type "
                f"{method.type!r} trains on {wanted}: use method.type "
                f"{'supervised' if supervised_file else 'ipo or dpo'} for this file, or another file.",
                param=param,
                code="invalid_training_file",
            )


def check_fits_model(model_dir: Path, method: Method, data_files: dict[str, Path]) -> list[str]:
    """Refuse settings the chosen model cannot train with: LoRA targets it does not have, a ``max_length``
    (``"auto"`` resolved exactly as the worker will, ``contracts.max_length``) over its positions or too
    short for the longest prompt of a data file, a ``chat_template`` that is no name and no usable Jinja,
    conversations the chat template refuses (the job's, the model's, or Zephyr's for a base model), or a
    file with no pair left to train on. Returns notes for the job's events: which chat template when it
    is not the model's own, what is done with text rows, and the pairs left out of training because their
    replies are identical once cut at ``max_length``."""
    params = method.params()
    prefix = f"method.{method.type}"
    requested = params.hyperparameters.max_length
    max_length_param = f"{prefix}.hyperparameters.max_length"
    try:
        if params.lora.target_modules != "auto":
            unknown, choices = unknown_target_modules(model_dir, list(params.lora.target_modules))
            if unknown:
                raise InvalidRequest(
                    f"LoRA target module(s) {', '.join(unknown)} do not exist in model {model_dir.name!r}; "
                    f"its linear layers are: {', '.join(choices)}.",
                    param=f"{prefix}.lora.target_modules",
                    code="invalid_lora_target_modules",
                )
        max_length = resolve_max_length(requested, read_config(model_dir), method.type)
        choice = resolve_chat_template(params.chat_template, model_dir, probe=False)
    except MaxLengthError as exc:
        raise InvalidRequest(f"max_length {exc} ({model_dir.name!r}).", param=max_length_param) from exc
    except ModelInfoError as exc:
        raise InvalidRequest(f"Model {model_dir.name!r} cannot be read: {exc}", param="model") from exc
    except ChatTemplateError as exc:
        raise InvalidRequest(f"{exc}.", param=f"{prefix}.chat_template", code="invalid_chat_template") from exc
    notes = [_sentence(choice.describe(model_dir.name))] if choice.source != "model" else []
    said = f"max_length {max_length}" + (" (auto for this model)" if requested == "auto" else "")
    if not method.is_preference:
        _check_supervised_files(model_dir, choice, data_files, max_length, said, max_length_param, notes)
        return notes
    if choice.source == "custom":  # the job's own Jinja: probed and rendered in a child process, never here
        try:
            measurements = measure_untrusted(model_dir, choice.template, data_files)
        except ChatTemplateError as exc:
            raise InvalidRequest(f"{exc}.", param=f"{prefix}.chat_template", code="invalid_chat_template") from exc
    else:
        tokenizer = tokenizer_for(model_dir, choice.template)
        if tokenizer is None:
            return notes
        measurements = {param: measure_file(path, tokenizer) for param, path in data_files.items()}
    for param, measured in measurements.items():
        if measured is None:
            continue
        if measured.invalid is not None:
            raise InvalidRequest(
                f"{param} cannot be used with model {model_dir.name!r}: {measured.invalid}",
                param=param,
                code="invalid_training_file",
            )
        if measured.refusals:
            raise InvalidRequest(
                describe_template_refusals(measured.refusals, param) + ".", param=param, code="invalid_training_file"
            )
        if measured.text_rows:
            notes.append(f"{param}: {measured.text_rows}")
        found = longest_prompt(measured, max_length)
        if found is not None and found.n_over:
            lines = ", ".join(map(str, found.over)) + (" and more" if found.n_over > len(found.over) else "")
            raise InvalidRequest(
                f"{said} leaves no room for a reply in {found.n_over} example(s) of {param} "
                f"(lines {lines}): their prompt alone is {max_length} tokens or more; the longest is "
                f"{found.tokens} tokens (line {found.line}). Raise max_length or shorten those prompts.",
                param=max_length_param,
                code="max_length_too_short",
            )
        identical = identical_after_truncation(measured, max_length)
        if identical and len(identical) == len(measured):
            raise InvalidRequest(
                f"No pair of {param} is left to train on at {said}: "
                + describe_left_out([], identical, max_length)
                + ". Raise max_length.",
                param=max_length_param,
                code="max_length_too_short",
            )
        if identical:
            notes.append(f"{param}: " + describe_left_out([], identical, max_length))
    return notes


def _check_supervised_files(
    model_dir: Path,
    choice: ChatTemplateChoice,
    data_files: dict[str, Path],
    max_length: int,
    said: str,
    max_length_param: str,
    notes: list[str],
) -> None:
    """The creation-time length checks of a supervised job's files (``app.services.sft_lengths``).

    A job's own Jinja template is never rendered on an API thread, so with one the lengths of
    supervised files are checked on the worker instead, and the job's events say so."""
    if choice.source == "custom":
        notes.append("Supervised files are measured against the job's own chat_template on the worker.")
        return
    tokenizer = tokenizer_for(model_dir, choice.template)
    if tokenizer is None:
        return
    for param, path in data_files.items():
        contexts = measure_supervised_file(path, tokenizer)
        if contexts is not None:
            check_supervised_file(
                contexts, param=param, max_length=max_length, said=said, max_length_param=max_length_param
            )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def check_active_jobs(session: Session, project_id: str, max_active: int) -> None:
    """429 once the project has ``max_active`` jobs in flight. The project row is locked first (Postgres)
    so two concurrent creates cannot both see room for one more."""
    if max_active <= 0:
        return
    session.execute(select(Project.id).where(Project.id == project_id).with_for_update())
    count = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.project_id == project_id, Job.status.in_([s.value for s in ACTIVE]))
    )
    if (count or 0) >= max_active:
        raise RateLimited(
            f"This project already has {count} active fine-tuning jobs (the limit is {max_active}); "
            "wait for one to finish or cancel one.",
            retry_after=ACTIVE_JOBS_RETRY_AFTER,
            retryable=False,  # jobs take minutes: an immediate SDK retry cannot succeed
        )


def check_n_gpus(n_gpus: int | None, max_gpus: int) -> int:
    """The devices a job asks for (None: 1); raises ``InvalidRequest`` (400, param ``n_gpus``) above
    ``max_gpus`` (``IPO_MAX_GPUS_PER_JOB``). The lower bound (>= 1) and the type are the schema's."""
    n = 1 if n_gpus is None else n_gpus
    if n > max_gpus:
        raise InvalidRequest(
            f"n_gpus is {n}, but a job may use at most {max_gpus} devices on this service (IPO_MAX_GPUS_PER_JOB).",
            param="n_gpus",
            code="invalid_n_gpus",
        )
    return n


def check_tracking_uris(integrations: list[WandbBlock | MlflowBlock], allowed: list[str]) -> None:
    """400 naming ``integrations[i].mlflow.tracking_uri`` when it is outside ``IPO_MLFLOW_ALLOWED_URIS``
    (the worker would send requests there: server-side request forgery on a shared service)."""
    for i, block in enumerate(integrations):
        uri = block.mlflow.tracking_uri if isinstance(block, MlflowBlock) else None
        if uri is not None and not tracking_uri_allowed(uri, allowed):
            raise InvalidRequest(
                f"integrations[{i}].mlflow.tracking_uri: {uri!r} is not an allowed MLflow tracking server on "
                f"this service (IPO_MLFLOW_ALLOWED_URIS: {', '.join(allowed) or 'none'}). Leave it out to use "
                "the worker's MLFLOW_TRACKING_URI, or ask the operator to allow it.",
                param=f"integrations[{i}].mlflow.tracking_uri",
                code="tracking_uri_not_allowed",
            )


def create_job(
    session: Session,
    *,
    project_id: str,
    body: JobCreate,
    models_dir: Path,
    storage: Storage,
    max_active: int = 0,
    max_gpus: int = 8,
    allowed_tracking_uris: list[str] | None = None,
) -> Job:
    """Create a queued job (and its outbox row) from a validated body.

    ``allowed_tracking_uris``: ``IPO_MLFLOW_ALLOWED_URIS`` (None: no restriction). Raises ``InvalidRequest``
    (400 naming the field) for a model, file, method or tracking URI that cannot be used, ``Conflict`` when
    the project has ``max_active`` jobs running or queued."""
    method = _merge_legacy_hyperparameters(body)
    n_gpus = check_n_gpus(body.n_gpus, max_gpus)
    if allowed_tracking_uris is not None:
        check_tracking_uris(body.integrations or [], allowed_tracking_uris)
    warm = None
    if body.from_checkpoint is not None:
        warm = resolve_warm_start(session, project_id, body.from_checkpoint, model=body.model, method_type=method.type)
        parent = session.get(Job, warm.job.parent_job_id) if warm.job.parent_job_id else None
        parent_ckpt = session.get(Checkpoint, warm.job.parent_checkpoint_id) if warm.job.parent_checkpoint_id else None
        start = Start(base_model=warm.job.base_model or warm.job.model, parent=parent, checkpoint=parent_ckpt)
        if not is_allowed(models_dir, start.base_model):
            raise InvalidRequest(
                f"from_checkpoint job {warm.job.id} was trained on {start.base_model!r}, which is not installed.",
                param="from_checkpoint",
                code="incompatible_base_model",
            )
    else:
        start = resolve_start(session, project_id, body.model, models_dir)
    data_files = {"training_file": _usable_file(session, project_id, body.training_file, "training_file")}
    if body.validation_file:
        data_files["validation_file"] = _usable_file(session, project_id, body.validation_file, "validation_file")
    check_method_fits_data(method, data_files)
    with ExitStack() as copies:
        paths = {p: copies.enter_context(storage.local_copy(f.storage_key)) for p, f in data_files.items()}
        notes = check_fits_model(models_dir / start.base_model, method, paths)
    check_active_jobs(session, project_id, max_active)
    job = Job(
        id=new_id("ftjob"),
        project_id=project_id,
        status=JobStatus.QUEUED,
        model=body.model,
        base_model=start.base_model,
        parent_job_id=start.parent.id if start.parent is not None else None,
        parent_checkpoint_id=start.checkpoint.id if start.checkpoint is not None else None,
        from_checkpoint_id=warm.checkpoint.id if warm is not None else None,
        training_file=body.training_file,
        validation_file=body.validation_file,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        job_metadata=body.metadata,
        method=method.model_dump(mode="json"),
        integrations=dump_integrations(body.integrations or []),
        n_gpus=n_gpus,
        created_at=utcnow(),
    )
    job.queued_at = job.created_at
    session.add(job)
    session.flush()
    add_event(session, job, f"Created fine-tuning job: {job.id}")
    if warm is not None:
        add_event(
            session,
            job,
            f"Warm start from checkpoint {warm.checkpoint.id} (step {warm.checkpoint.step}) of job {warm.job.id}: its "
            "adapter weights are the starting point; the optimiser state and learning-rate schedule start fresh "
            "(not a resume)",
        )
    elif start.parent is not None:
        ckpt = start.checkpoint
        what = f"checkpoint {ckpt.id} (step {ckpt.step}) of" if ckpt is not None else "the model of"
        add_event(
            session,
            job,
            f"Starting from {what} job {start.parent.id}: its adapter is merged into {start.base_model} before "
            "a new adapter is trained" + (", and that merged model is the reference" if method.is_preference else ""),
        )
    for note in notes:
        add_event(session, job, note)
    if n_gpus > 1:
        add_event(
            session, job, f"Trains on {n_gpus} devices at once: waits for a worker that declares {n_gpus} or more"
        )
    add_event(session, job, "Files validated, job queued")
    enqueue_dispatch(session, job)
    return job


def get_job(session: Session, project_id: str, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.project_id == project_id))
    if job is None:
        raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
    return job


def require_job(session: Session, project_id: str, job_id: str) -> str:
    """``job_id`` when it is a job of ``project_id``, else ``NotFound`` (as ``get_job``), reading only the
    id: for routes that need the tenancy check but not the row (the events page, its stream)."""
    if session.scalar(select(Job.id).where(Job.id == job_id, Job.project_id == project_id)) is None:
        raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
    return job_id


def list_jobs(
    session: Session,
    project_id: str,
    *,
    after: str | None,
    limit: int,
    metadata: dict[str, str],
    status: JobStatus | None = None,
) -> tuple[list[Job], bool]:
    """Newest first, keyset-paginated on (created_at, id); ``metadata`` entries must all match exactly.

    Metadata filters are pushed into SQL where the dialect can do so safely (Postgres ``->>``, SQLite
    ``json_extract`` for plain keys) and always re-checked in Python, reading the ordered rows in batches
    until ``limit + 1`` matches are found, so a page is full, ``has_more`` is exact and the next page
    starts right after the last row returned.
    """
    stmt = select(Job).where(Job.project_id == project_id)
    if status is not None:  # the dashboard's filter (index ix_jobs_project_status_created)
        stmt = stmt.where(Job.status == status.value)
    if after:
        cursor = get_job(session, project_id, after)
        stmt = stmt.where(_older_than(cursor))
    if not metadata:
        rows = list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit
    dialect = session.get_bind().dialect.name
    for key, value in metadata.items():
        if dialect == "postgresql" or (dialect == "sqlite" and _SQLITE_SAFE_KEY.match(key)):
            stmt = stmt.where(Job.job_metadata[key].as_string() == value)
    matches: list[Job] = []
    last: Job | None = None
    while len(matches) <= limit:
        page = stmt if last is None else stmt.where(_older_than(last))
        batch = list(session.scalars(page.order_by(Job.created_at.desc(), Job.id.desc()).limit(METADATA_SCAN_BATCH)))
        matches += [r for r in batch if all((r.job_metadata or {}).get(k) == v for k, v in metadata.items())]
        if len(batch) < METADATA_SCAN_BATCH:
            break
        last = batch[-1]
    return matches[:limit], len(matches) > limit


_SQLITE_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
"""Keys that need no quoting inside a SQLite JSON path; others are filtered in Python only."""


def _older_than(cursor: Job) -> Any:
    # A row-value comparison, not created_at < c OR (created_at = c AND id < c.id): Postgres takes the
    # tuple as the bound of its (project_id[, status], created_at, id) index scan, where the OR form
    # scanned from the newest job and filtered (a page half-way through 100,000 jobs: 13 ms vs 3 ms).
    return tuple_(Job.created_at, Job.id) < tuple_(cursor.created_at, cursor.id)


def _transition(
    session: Session,
    job: Job,
    expected: Iterable[JobStatus],
    new: JobStatus,
    action: str,
    **values: Any,
) -> Job:
    expected = tuple(expected)
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_([s.value for s in expected]))
        .values(status=new.value, **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.refresh(job)
        raise Conflict(f"Cannot {action} job {job.id}: it is {job.status}.", code="invalid_state")
    session.refresh(job)
    return job


def cancel_job(session: Session, project_id: str, job_id: str) -> Job:
    job = get_job(session, project_id, job_id)
    job = _transition(session, job, ACTIVE, JobStatus.CANCELLED, "cancel", finished_at=utcnow())
    add_event(session, job, "Job cancelled by user")
    webhooks.emit_job(session, job, webhooks.JOB_CANCELLED)
    metrics.job_ended(session, job)
    return job


def pause_job(session: Session, project_id: str, job_id: str) -> Job:
    job = get_job(session, project_id, job_id)
    job = _transition(session, job, [JobStatus.RUNNING], JobStatus.PAUSED, "pause")
    add_event(session, job, "Pause requested: saving a checkpoint")
    webhooks.emit_job(session, job, webhooks.JOB_PAUSED)
    return job


def resume_job(session: Session, project_id: str, job_id: str) -> Job:
    job = get_job(session, project_id, job_id)
    if job.status == JobStatus.PAUSED and job.lease_token is not None:
        raise Conflict(
            f"Job {job.id} is still saving its pause checkpoint; resume it in a few seconds.",
            code="pause_in_progress",
            retryable=True,
        )
    job = _transition(session, job, [JobStatus.PAUSED], JobStatus.QUEUED, "resume", queued_at=utcnow())
    add_event(session, job, "Job resumed: queued")
    enqueue_dispatch(session, job)
    return job


def count_by_status(session: Session, project_id: str) -> dict[str, int]:
    rows = session.execute(
        select(Job.status, func.count()).where(Job.project_id == project_id).group_by(Job.status)
    ).all()
    return {str(status): int(n) for status, n in rows}


def get_checkpoint(session: Session, project_id: str, job_id: str, checkpoint_id: str) -> Checkpoint:
    job = get_job(session, project_id, job_id)
    row = session.scalar(select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job.id))
    if row is None:
        raise NotFound(f"No such checkpoint: {checkpoint_id}", param="checkpoint_id")
    return row


def list_checkpoints(
    session: Session, project_id: str, job_id: str, *, after: str | None, limit: int
) -> tuple[list[Checkpoint], bool]:
    """Newest (highest step) first, like OpenAI's checkpoint list."""
    job = get_job(session, project_id, job_id)
    stmt = select(Checkpoint).where(Checkpoint.job_id == job.id)
    if after:
        cursor = session.scalar(select(Checkpoint).where(Checkpoint.id == after, Checkpoint.job_id == job.id))
        if cursor is None:
            raise InvalidRequest(f"after: no such checkpoint {after}", param="after")
        stmt = stmt.where(tuple_(Checkpoint.step, Checkpoint.id) < tuple_(cursor.step, cursor.id))
    rows = list(session.scalars(stmt.order_by(Checkpoint.step.desc(), Checkpoint.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
