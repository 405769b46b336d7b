"""Job spec files: a job's create body as a versioned document that can be kept in git and replayed.

A spec is exactly the body of ``POST /v1/fine_tuning/jobs`` (``JobCreate``) plus ``spec_version``.
``GET /v1/fine_tuning/jobs/{id}/spec`` writes an existing job back as one (Fireworks' "clone a job's
config"); ``ipo jobs create --spec FILE`` replays it; ``GET /schemas/job-spec.v1.json`` publishes its
JSON Schema, generated from these same pydantic models, so editors and CI can check spec files.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from app.schemas.requests import JobCreate

SPEC_VERSION: Literal[1] = 1
"""The spec format's version. A change that would make an old spec mean something else bumps it."""

SCHEMA_PATH = f"/schemas/job-spec.v{SPEC_VERSION}.json"
"""Where the API serves the JSON Schema of this version (stable: a new version gets a new path)."""


class JobSpec(JobCreate):
    """``POST /v1/fine_tuning/jobs``'s body plus ``spec_version``; unknown keys are refused (extra=forbid).

    ``training_file`` / ``validation_file`` are file ids; the CLI also accepts local paths there and
    uploads them first. A spec written from a job (``spec_of_job``) has every ``"auto"`` and default of
    ``method`` spelled out and the job's seed, so replaying it asks for the same run.
    """

    spec_version: Literal[1] = Field(
        SPEC_VERSION, description="Version of the job spec format (ipo-align). Only 1 exists."
    )

    def create_body(self) -> dict[str, Any]:
        """The ``POST /v1/fine_tuning/jobs`` JSON body this spec asks for (``spec_version`` dropped)."""
        return self.model_dump(mode="json", exclude={"spec_version"}, exclude_none=True)


def job_spec_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``JobSpec``, with its stable ``$id`` path."""
    schema = JobSpec.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_PATH,
        **schema,
        "title": f"ipo-align job spec v{SPEC_VERSION}",
    }
