"""``/schemas/...``: JSON Schemas of the documents users keep in files (public, no key: they are docs)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.schemas.job_spec import SCHEMA_PATH, job_spec_json_schema

router = APIRouter(tags=["schemas"])


@router.get(SCHEMA_PATH, response_model=None)
def job_spec_schema() -> dict[str, Any]:
    """The JSON Schema of job spec files, version 1 (``app.schemas.job_spec``); the path never changes."""
    return job_spec_json_schema()
