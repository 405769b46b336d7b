"""Worker configuration: ``IPO_*`` environment variables with embedded defaults under ``./var``.

A worker machine needs only the API URL, the broker URL, the worker token and a GPU (docs/design.md).
Paths left unset are derived from ``IPO_VAR_DIR`` so one variable moves the whole embedded setup.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from contracts.broker import FILESYSTEM_BROKER, filesystem_transport_options
from contracts.integrations import DEFAULT_ALLOWED_TRACKING_URIS, parse_allowed_uris
from contracts.internal import DEFAULT_QUEUE, worker_queues
from contracts.logs import LogFormat
from worker.launcher import parse_devices

WORKER_TOKEN_FILE = "worker_token"


class WorkerTokenMissing(RuntimeError):
    """Neither ``IPO_WORKER_TOKEN`` nor ``{var_dir}/worker_token`` (written by the API) is there."""


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IPO_", extra="ignore")

    var_dir: Path = Path("./var")
    """Root of the embedded default layout (broker folders, models, work dirs, worker token)."""
    api_url: str = "http://127.0.0.1:8000"
    broker_url: str = FILESYSTEM_BROKER
    """``filesystem://`` = kombu's filesystem transport under ``{var_dir}/broker``; else e.g. ``redis://...``."""
    queue: str = DEFAULT_QUEUE
    """Celery queue to consume (``IPO_QUEUE``; the API sends to the same one)."""
    worker_token: SecretStr | None = None
    """Overrides the token the API generates into ``{var_dir}/worker_token`` on first start."""
    models_dir: Path | None = None
    """Base models, one directory per allow-listed name (``{models_dir}/{model}/config.json``).

    Default ``{var_dir}/models``."""
    work_dir: Path | None = None
    """Per-attempt scratch directories. Default ``{var_dir}/work``."""
    training_cache_dir: Path | None = None
    """Tokenized training data with its reference log-probs, reused by retries, resumes and repeated jobs
    (``worker/training/ref_cache.py``). Default ``{var_dir}/cache/training``."""
    training_cache_max_bytes: int = Field(default=20 * 2**30, ge=0)
    """Size bound of that cache; least recently used entries are pruned beyond it."""
    heartbeat_seconds: float | None = None
    """Overrides the heartbeat interval the API hands out with each claim (tests, debugging)."""
    stop_grace_seconds: float = Field(default=60.0, gt=0)
    """How long a trainer asked to stop (cancel/pause/shutdown) may take before its process group is killed."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cuda`` or ``cpu``: passed to the trainer."""
    worker_gpus: str | None = None
    """The devices this worker may train on, as CUDA indices or UUIDs (``0,1,2,3``) or a count (``4`` = 0..3);
    unset: one device and no reservation (one worker per GPU, as before). A worker that declares N consumes
    the queues of 1- to N-device jobs (``contracts.internal.worker_queues``) and reserves each job's devices
    from the host's pool (``worker/launcher.py``), its ``CUDA_VISIBLE_DEVICES``. On a CPU worker (``IPO_DEVICE=cpu``)
    the ids only count processes."""
    device_lock_dir: Path | None = None
    """The host's device pool: one ``flock`` file per device, shared by every worker process on the host that
    declares devices. Default ``{var_dir}/devices``."""
    device_wait_seconds: float = Field(default=600.0, ge=0)
    """How long a claimed job waits for its devices while other jobs on the host hold them (its lease kept
    alive by heartbeats) before the attempt fails as ``devices_busy`` (retryable)."""
    accelerate_config: Path | None = None
    """An ``accelerate config`` file used for jobs on several devices instead of plain DDP (``--multi_gpu``):
    FSDP for models that do not fit one device (docs/multi-gpu.md). The job's ``n_gpus`` still sets
    ``--num_processes``."""
    trainer_module: str = "worker.training.run"
    """Started as ``python -m {trainer_module} REQUEST_JSON --report-fd N`` (tests swap in a fake)."""
    worker_id: str = Field(default_factory=_default_worker_id)
    """Names this worker in claims (shown by the API, useful when tracing a fenced-off worker)."""
    api_retry_seconds: float = Field(default=300.0, gt=0)
    """How long a transient API failure (connect error, 5xx, 429) is retried before giving up."""
    keep_work_dirs: bool = False
    """Keep per-attempt directories after the attempt ends (they are always kept after a failure)."""
    grader_base_url: str | None = None
    """OpenAI-compatible API that ``score_model`` graders call (``{url}/chat/completions``), e.g. this service's
    own ``http://api:8000/v1`` or any provider's. Unset: such graders' scores are null, with a warning event."""
    grader_api_key: SecretStr | None = None
    """Bearer key for ``grader_base_url`` (an API key of this service when it grades itself)."""
    grader_timeout_seconds: float = Field(default=60.0, gt=0)
    """Per grader request (one retry after a connection error or 5xx, the ``openai`` client's)."""
    mlflow_allowed_uris: Annotated[list[str], NoDecode] = list(DEFAULT_ALLOWED_TRACKING_URIS)
    """MLflow servers a job's ``tracking_uri`` may name, as the API's ``IPO_MLFLOW_ALLOWED_URIS`` (same
    format and default: loopback only); checked again here because the worker is what connects."""
    log_level: str = "INFO"
    """Root log level (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``)."""
    log_format: LogFormat = "auto"
    """``json`` (one object per line), ``text`` (for people), or ``auto``: text when stderr is a terminal."""

    @field_validator("mlflow_allowed_uris", mode="before")
    @classmethod
    def _allowed_uris(cls, value: Any) -> Any:
        return parse_allowed_uris(value)

    @model_validator(mode="after")
    def _derive_paths(self) -> WorkerSettings:
        if self.models_dir is None:
            self.models_dir = self.var_dir / "models"
        if self.work_dir is None:
            self.work_dir = self.var_dir / "work"
        if self.training_cache_dir is None:
            self.training_cache_dir = self.var_dir / "cache" / "training"
        if self.device_lock_dir is None:
            self.device_lock_dir = self.var_dir / "devices"
        parse_devices(self.worker_gpus)  # a malformed list stops the worker at start, not at its first job
        return self

    @property
    def devices(self) -> list[str]:
        """The declared device ids (``IPO_WORKER_GPUS``); empty when none are declared."""
        return parse_devices(self.worker_gpus)

    @property
    def queues(self) -> list[str]:
        """The Celery queues this worker consumes: ``IPO_QUEUE`` and one per job size up to its device count."""
        return worker_queues(self.queue, max(1, len(self.devices)))

    @property
    def models_path(self) -> Path:
        assert self.models_dir is not None  # set by _derive_paths
        return self.models_dir

    @property
    def work_path(self) -> Path:
        assert self.work_dir is not None  # set by _derive_paths
        return self.work_dir

    @property
    def broker_dir(self) -> Path:
        return self.var_dir / "broker"

    def resolve_worker_token(self) -> str:
        """The token for ``/internal/v1``, read at call time: the API may write the file after we start."""
        if self.worker_token is not None:
            return self.worker_token.get_secret_value()
        path = self.var_dir / WORKER_TOKEN_FILE
        try:
            token = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            token = ""
        if not token:
            raise WorkerTokenMissing(f"no worker token: set IPO_WORKER_TOKEN or start the API once so it writes {path}")
        return token

    def broker_transport_options(self, *, create: bool = True) -> dict[str, Any]:
        """Transport options for the broker; for ``filesystem://`` creates the folders it needs."""
        if not self.broker_url.startswith(FILESYSTEM_BROKER):
            return {}
        return filesystem_transport_options(self.broker_dir, create=create)
