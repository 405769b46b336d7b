"""Request bodies of the public API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from app.errors import InvalidRequest
from contracts.integrations import MAX_INTEGRATIONS, Integration, IntegrationError, parse_integrations
from contracts.method import Method

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
"""What any object id looks like (``file-...``, ``ftjob-...``, ``ft:model:suffix:ftjob-...``)."""

MAX_BODY_DEPTH = 16

MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=64, pattern=ID_PATTERN)
    validation_file: str | None = Field(None, min_length=1, max_length=64, pattern=ID_PATTERN)
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: StrictInt | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)
    method: Method = Field(default_factory=lambda: Method(type="ipo"))
    hyperparameters: dict[str, object] | None = None
    """OpenAI's deprecated top-level hyperparameters; merged into ``method`` when given."""
    integrations: list[Integration] | None = Field(None, max_length=MAX_INTEGRATIONS)
    """Experiment trackers the run is logged to (``contracts.integrations``): OpenAI's ``wandb`` and the
    ``mlflow`` extension. Credentials come from the worker's environment, never from here."""
    from_checkpoint: str | None = Field(None, min_length=1, max_length=300)
    """ipo-align extension (Together's name): warm-start from a checkpoint (id or ``fine_tuned_model_checkpoint``
    name) of a finished, failed or cancelled job of the same method and model: its adapter weights are the
    starting point, the optimiser state is not reused (``app/services/lineage.py``)."""
    n_gpus: StrictInt | None = Field(None, ge=1, le=1024)
    """ipo-align extension: devices one job trains on (data-parallel, ``accelerate launch``; docs/multi-gpu.md).
    Omitted or null means 1. At most ``IPO_MAX_GPUS_PER_JOB`` (checked in ``app/services/jobs.py``, 400 naming
    ``n_gpus``). ``batch_size`` stays per device: each optimiser step sees ``batch_size *
    gradient_accumulation_steps * n_gpus`` pairs."""

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        _refuse_unstorable(data)
        return data

    @field_validator("integrations", mode="before")
    @classmethod
    def _integrations(cls, value: Any) -> Any:
        """Parsed here so the 400 names the field as ``integrations[0].mlflow.tracking_uri`` and refuses
        anything that looks like a credential with the reason (``contracts.integrations``)."""
        if value is None:
            return None
        try:
            return parse_integrations(value)
        except IntegrationError as exc:
            raise InvalidRequest(exc.args[0], param=exc.param, code="invalid_integration") from exc

    @field_validator("metadata")
    @classmethod
    def _no_control_chars(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for k, v in (value or {}).items():
            if any(ord(c) < 32 or ord(c) == 127 for c in k + v):
                raise ValueError(f"metadata entry {k!r} contains control characters")
        return value


def _refuse_unstorable(data: Any) -> None:
    """Refuse (400 naming the field) what the database cannot store or should not parse: a NUL character
    (Postgres text and JSONB hold none), a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON but not
    UTF-8), or nesting deeper than ``MAX_BODY_DEPTH``. Raised as ``InvalidRequest``, which pydantic lets
    through, so the error names the field rather than the whole body."""
    if (problem := _body_problem(data)) is not None:
        where, message = problem
        raise InvalidRequest(f"{where}: {message}" if where else message, param=where)


def _unstorable_text(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character"
    if any("\ud800" <= c <= "\udfff" for c in text):
        return "contains a lone UTF-16 surrogate (not valid Unicode text)"
    return None


def _body_problem(data: Any) -> tuple[str | None, str] | None:
    """Walk the raw body without recursion: ``(field path, what is wrong)`` of the first unstorable
    string or over-deep nesting, if any."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        where = ".".join(path) or None
        if len(path) > MAX_BODY_DEPTH:
            return where, f"nested deeper than {MAX_BODY_DEPTH} levels"
        if isinstance(value, str) and (problem := _unstorable_text(value)):
            return where, problem
        if isinstance(value, dict):
            for k, v in value.items():
                if problem := _unstorable_text(str(k)):
                    return where, f"has a key that {problem}"
                stack.append((v, (*path, str(k))))
        elif isinstance(value, list):
            stack.extend((v, (*path, str(i))) for i, v in enumerate(value))
    return None


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2000)
    events: list[Annotated[str, Field(max_length=80)]] | None = Field(None, max_length=20)
    """Event types to deliver; omitted or null means all of them."""
    description: str | None = Field(None, max_length=500)

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        _refuse_unstorable(data)
        return data
