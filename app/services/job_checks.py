"""The checks a job body passes before a job is created (``jobs.create_job`` calls them in order): legacy
hyperparameters merged into ``method``, usable files, the method against the data's format, the data and
method against the model (lengths, chat template, LoRA targets), the active-job limit, ``n_gpus`` and
tracking URIs. Each refusal is an ``InvalidRequest`` (400) or ``RateLimited`` (429) naming the field.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import InvalidRequest, RateLimited, describe_validation_errors
from app.models import FileStatus, Job, Project, StoredFile
from app.models.job import ACTIVE_STATUSES
from app.schemas.requests import JobCreate
from app.services import files as files_service
from app.services.prompt_lengths import (
    identical_after_truncation,
    longest_prompt,
    measure_file,
    measure_untrusted,
    tokenizer_for,
)
from app.services.sft_lengths import check_supervised_file, measure_supervised_file
from contracts.chat_templates import (
    ChatTemplateChoice,
    ChatTemplateError,
    describe_template_refusals,
    resolve_chat_template,
)
from contracts.integrations import MlflowBlock, WandbBlock, tracking_uri_allowed
from contracts.max_length import MaxLengthError, resolve_max_length
from contracts.method import PREFERENCE_ONLY, Method
from contracts.model_info import ModelInfoError, read_config, unknown_target_modules
from contracts.pair_tokens import describe_left_out
from contracts.sft_formats import SUPERVISED_FORMATS

ACTIVE_JOBS_RETRY_AFTER = 30
"""``Retry-After`` of the too-many-active-jobs 429: jobs take minutes, so polling faster is pointless."""


def merge_legacy_hyperparameters(body: JobCreate) -> Method:
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


def usable_file(session: Session, project_id: str, file_id: str, param: str) -> StoredFile:
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
    format was recognised at upload), preference-only hyperparameters on a supervised job, and a
    ``samples.holdout`` count beside a validation file (whose prompts are sampled instead)."""
    prefix = f"method.{method.type}.hyperparameters"
    params = method.params()
    hp = params.hyperparameters
    for name in () if method.is_preference else PREFERENCE_ONLY:
        if getattr(hp, name) != "auto":
            raise InvalidRequest(
                f"{name} applies to preference methods (ipo, dpo), not to supervised fine-tuning.",
                param=f"{prefix}.{name}",
            )
    holdout = params.samples.holdout
    if "validation_file" in data_files and holdout != "auto" and holdout > 0:
        raise InvalidRequest(
            f"holdout {holdout} holds training prompts out for samples, but this job has a validation_file, "
            "whose prompts are sampled instead: leave holdout out (auto) or set it to 0.",
            param=f"method.{method.type}.samples.holdout",
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
        .where(Job.project_id == project_id, Job.status.in_([s.value for s in ACTIVE_STATUSES]))
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
