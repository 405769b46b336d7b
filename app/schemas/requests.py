"""Request bodies of the public API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)
    method: Method = Field(default_factory=lambda: Method(type="ipo"))
    hyperparameters: dict[str, object] | None = None
    """OpenAI's deprecated top-level hyperparameters; merged into ``method`` when given."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        # Postgres can store no NUL character in text or JSONB, and a deeply nested document is a parser
        # and storage hazard: refuse both here as a 400 instead of failing later in the database.
        if (problem := _body_problem(data)) is not None:
            raise ValueError(problem)
        return data

    @field_validator("metadata")
    @classmethod
    def _no_control_chars(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for k, v in (value or {}).items():
            if any(ord(c) < 32 or ord(c) == 127 for c in k + v):
                raise ValueError(f"metadata entry {k!r} contains control characters")
        return value


def _body_problem(data: Any) -> str | None:
    """Walk the raw body without recursion: the first NUL character or over-deep nesting, if any."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        where = ".".join(path) or "body"
        if len(path) > MAX_BODY_DEPTH:
            return f"{where}: nested deeper than {MAX_BODY_DEPTH} levels"
        if isinstance(value, str) and "\x00" in value:
            return f"{where} contains a NUL character"
        if isinstance(value, dict):
            for k, v in value.items():
                if "\x00" in str(k):
                    return f"{where} has a key containing a NUL character"
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
    def _no_nul(cls, data: Any) -> Any:
        if (problem := _body_problem(data)) is not None:
            raise ValueError(problem)
        return data
