"""What the supervisor hands the trainer child process: one JSON file, ``request.json`` in its work dir.

The child is started as ``python -m worker.training.run REQUEST_JSON --report-fd N``. It writes
``contracts.internal.TrainerReport`` lines (JSON, one per line) to fd N and exits with:

- ``0``  success (a ``done`` report and an ``artifact`` named ``adapter`` were sent);
- ``75`` stopped on request (SIGUSR1 = pause/shutdown: a checkpoint was saved and reported first;
  SIGTERM = cancel: stop at the next step, nothing saved);
- anything else: failure (an ``error`` report with ``code`` and ``message`` was sent when possible).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from contracts.integrations import DEFAULT_ALLOWED_TRACKING_URIS, Integration
from contracts.method import Method

EXIT_OK = 0
EXIT_STOPPED = 75


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    attempt: int
    model_path: str
    """Directory with config.json, safetensors weights and tokenizer files (local, never a hub id)."""
    train_file: str
    """Local JSONL path (already downloaded by the worker)."""
    validation_file: str | None = None
    output_dir: str
    """Per-attempt directory: checkpoints go to ``output_dir/checkpoints/step-N``,
    the adapter to ``output_dir/adapter``."""
    resume_from: str | None = None
    """A complete checkpoint directory (unzipped) to resume from."""
    init_adapter: str | None = None
    """Warm start (``from_checkpoint``): a checkpoint directory whose ``adapter_model.safetensors`` initialises
    the new adapter; its optimiser and scheduler state are not loaded (not a resume). Ignored with ``resume_from``."""
    parent_adapters: list[str] = []
    """Adapter directories (PEFT ``adapter_model.safetensors`` + ``adapter_config.json``), root first, merged
    into the base model in this order before the new adapter is added: the job starts from a fine-tuned
    model. The merged model is also the reference of an IPO/DPO job."""
    seed: int = 42
    method: Method
    integrations: list[Integration] = Field(default_factory=list)
    """Experiment trackers to log the run to (``worker/training/trackers.py``)."""
    mlflow_allowed_uris: list[str] = Field(default_factory=lambda: list(DEFAULT_ALLOWED_TRACKING_URIS))
    """The worker's ``IPO_MLFLOW_ALLOWED_URIS``: a job's ``tracking_uri`` outside it is not contacted (a
    warning event says so); the API refuses such jobs at creation already."""
    lineage: dict[str, str] = Field(default_factory=dict)
    """Where the run comes from, for the trackers' tags: ``parent_jobs`` (the jobs whose adapters it starts
    from, root first), ``parent_checkpoint``, ``training_file``, ``validation_file`` (file ids), ``suffix``,
    ``resumed_from_checkpoint`` (checkpoint id)."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cuda`` or ``cpu``."""
    cache_dir: str | None = None
    """Where tokenized pairs and their reference log-probs are cached across attempts and jobs
    (``worker/training/ref_cache.py``); None: no cache."""
    cache_max_bytes: int | None = None
    """Least recently used cache entries are pruned beyond this size; None: unbounded."""
