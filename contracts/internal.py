"""Bodies of the worker <-> API protocol (``/internal/v1``) and of the trainer's report lines.

The worker never touches the database: it claims a job, heartbeats, relays reports and uploads
artifacts through these shapes, every write carrying the lease token it got from the claim (fencing).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.integrations import Integration
from contracts.method import Method

Action = Literal["continue", "cancel", "pause"]
StopReason = Literal["paused", "cancelled", "shutdown"]
"""Why a trainer stopped before the end: the one vocabulary of the worker (supervisor, trainer's stop flag)
and of ``StoppedRequest``. The trainer itself only sees ``paused`` (SIGUSR1: checkpoint, then exit; a
worker shutdown asks the same) or ``cancelled`` (SIGTERM: exit)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DispatchMessage(_Body):
    """The Celery message: a doorbell that names a job. Everything else comes from the claim."""

    job_id: str


class ClaimRequest(_Body):
    worker_id: str = Field(max_length=200)


class ParentAdapter(_Body):
    """One adapter of a job's lineage: the final adapter of an earlier job, or one of its checkpoints."""

    job_id: str
    checkpoint_id: str | None = None
    download_path: str
    """Relative to the API base URL: GET it (worker token) to fetch the adapter zip."""


class JobSpec(_Body):
    """What a worker needs to run a job (from the claim response)."""

    job_id: str
    model: str
    """The allow-listed base model directory (the root of the lineage)."""
    parents: list[ParentAdapter] = Field(default_factory=list)
    """Adapters to merge into the base, root first, before the new adapter is trained: the lineage of a
    job whose ``model`` was a fine-tuned model or checkpoint. For IPO/DPO the merged model is also the
    reference. Empty for a job on a base model."""
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int
    method: Method
    integrations: list[Integration] = Field(default_factory=list)
    """Trackers to log the run to (``contracts.integrations``); credentials come from the worker's env."""
    warm_start: ParentAdapter | None = None
    """``from_checkpoint``: initialise the new adapter from this checkpoint's adapter weights (optimiser and
    learning-rate schedule start fresh). A resume of the job's own checkpoint (``resume_from``) wins."""
    n_gpus: int = Field(1, ge=1)
    """Devices to train on at once: the worker reserves that many and starts one trainer process on each
    (``accelerate launch``, data-parallel; docs/multi-gpu.md)."""


class ResumeFrom(_Body):
    checkpoint_id: str
    step: int
    download_path: str
    """Relative to the API base URL: GET it (worker token) to fetch the checkpoint zip."""


class ClaimResponse(_Body):
    job_id: str
    attempt: int
    lease_token: str
    lease_seconds: int
    heartbeat_seconds: int
    spec: JobSpec
    resume_from: ResumeFrom | None = None


class Leased(_Body):
    lease_token: str


class Progress(_Body):
    step: int | None = None
    total_steps: int | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    """Unix seconds."""


class HeartbeatRequest(Leased):
    progress: Progress | None = None
    resolved_hyperparameters: dict[str, Any] | None = None


class HeartbeatResponse(_Body):
    action: Action
    status: str
    lease_seconds: int


class ControlResponse(_Body):
    """``GET /internal/v1/jobs/{id}/control``: what the user asked of the job, the moment it changes."""

    action: Action
    """``cancel`` / ``pause`` while the job is cancelled / paused, else ``continue`` (as in a heartbeat)."""
    status: str
    """The job's status now; the worker passes it back as ``status`` to wait for the next change."""


CONTROL_WAIT_SECONDS_MAX = 25.0
"""The longest a control request is held open: below the worker client's 60 s read timeout and the
idle timeouts of common proxies (nginx: 60 s)."""


class ReportedEvent(_Body):
    seq: Annotated[int, Field(ge=0)]
    """Per attempt, assigned by the worker; the API drops a (attempt, seq) it already has."""
    type: Literal["message", "metrics"] = "message"
    level: Literal["info", "warn", "error"] = "info"
    message: str = Field(max_length=4000)
    data: dict[str, Any] | None = None
    created_at: int
    """Unix seconds, when the trainer reported it."""


class EventsRequest(Leased):
    events: Annotated[list[ReportedEvent], Field(max_length=1000)]


class EventsResponse(_Body):
    accepted: int
    duplicates: int


class FinishRequest(Leased):
    trained_tokens: int | None = None
    adapter_file_id: str
    result_file_ids: list[str] = Field(default_factory=list)


class FailRequest(Leased):
    code: str = Field(max_length=100)
    message: str = Field(max_length=4000)
    retryable: bool = False
    """True when a later attempt may succeed (worker died, lost lease); False for bad data, OOM, NaN."""


class StoppedRequest(Leased):
    """The trainer stopped on request (pause or shutdown), leaving the job resumable."""

    reason: StopReason


# ---- trainer -> worker report lines (JSON, one per line, on the report pipe) ----


class TrainerReport(_Body):
    kind: Literal["event", "metrics", "resolved", "checkpoint", "artifact", "done", "error"]
    level: Literal["info", "warn", "error"] = "info"
    message: str | None = None
    data: dict[str, Any] | None = None
    step: int | None = None
    path: str | None = None
    name: str | None = None
    code: str | None = None
    time: float | None = None


# ---- the Celery doorbell: the API sends by name, the worker registers the task under it ----

TASK_NAME = "ipo.run_job"
DEFAULT_QUEUE = "ipo.jobs"
"""Overridden on both sides by ``IPO_QUEUE`` (tests give each run its own)."""


def queue_for(base_queue: str, n_gpus: int) -> str:
    """The Celery queue of a job that trains on ``n_gpus`` devices: ``base_queue`` itself for one (every
    worker consumes it), ``{base_queue}.gpus-{n}`` for more, consumed only by workers that declare at least
    ``n`` devices (``worker_queues``). Raises ``ValueError`` for ``n_gpus`` < 1."""
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be at least 1, got {n_gpus}")
    return base_queue if n_gpus == 1 else f"{base_queue}.gpus-{n_gpus}"


def worker_queues(base_queue: str, n_devices: int) -> list[str]:
    """Every queue a worker with ``n_devices`` devices consumes: ``queue_for(base_queue, n)`` for n = 1..n_devices
    (a 4-GPU worker takes 1-, 2-, 3- and 4-GPU jobs; a 1-device worker only ``base_queue``)."""
    return [queue_for(base_queue, n) for n in range(1, max(1, n_devices) + 1)]
