"""Request bodies of the public API."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from contracts.method import Method

MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)
    method: Method = Field(default_factory=lambda: Method(type="ipo"))
    hyperparameters: dict[str, object] | None = None
    """OpenAI's deprecated top-level hyperparameters; merged into ``method`` when given."""

    @field_validator("metadata")
    @classmethod
    def _no_control_chars(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for k, v in (value or {}).items():
            if any(ord(c) < 32 or ord(c) == 127 for c in k + v):
                raise ValueError(f"metadata entry {k!r} contains control characters")
        return value
