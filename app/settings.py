"""API settings: environment variables with prefix ``IPO_``, each with a safe embedded default.

The embedded default (SQLite + Celery filesystem transport + local storage under ``./var``) needs
nothing installed or running; production sets the URLs to Postgres, Redis and S3.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, IPvAnyNetwork, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from contracts.broker import filesystem_transport_options
from contracts.integrations import DEFAULT_ALLOWED_TRACKING_URIS, parse_allowed_uris
from contracts.internal import DEFAULT_QUEUE
from contracts.logs import LogFormat


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IPO_", extra="ignore")

    var_dir: Path = Path("./var")
    """Where the embedded default keeps its database, broker folders, artifacts and secrets."""
    database_url: str | None = None
    """SQLAlchemy URL of the ledger. Default: ``sqlite:///{var_dir}/ipo.db``."""
    broker_url: str | None = None
    """Celery broker. Default: the filesystem transport under ``{var_dir}/broker``."""
    redis_url: str | None = None
    """Redis shared by the API processes (per-key rate limits). Default: the broker when it is Redis."""
    storage_url: str | None = None
    """Artifact store: ``file://PATH`` or ``s3://BUCKET[/PREFIX]`` (S3-compatible; endpoint, region and
    credentials from the AWS SDK environment, app/storage/s3.py). Default: ``file://{var_dir}/storage``."""
    storage_presign_seconds: int = Field(0, ge=0, le=7 * 24 * 3600)
    """With ``s3://`` storage and > 0, file downloads (``GET /v1/files/{id}/content``, the dashboard's) answer
    ``307`` to a presigned URL of the object valid this many seconds, so the bytes go from the store to the
    client without passing through the API (the ``openai`` SDK and browsers follow it). 0 (default):
    the API streams them. At most 7 days, S3's limit for SigV4 URLs."""
    storage_public_endpoint_url: str | None = None
    """The S3 endpoint clients reach, when it is not the one the API uses (``http://minio:9000`` inside
    compose): presigned URLs are signed for this host. Default: the API's endpoint."""
    models_dir: Path | None = None
    """Base models (one directory each, with config.json); also the allow-list. Default ``{var_dir}/models``."""
    worker_token: str | None = None
    """Shared secret for ``/internal/v1``. Default: generated into ``{var_dir}/worker_token`` on first start."""

    queue: str = DEFAULT_QUEUE
    """Celery queue the doorbells go to (the workers consume the same ``IPO_QUEUE``)."""
    heartbeat_seconds: int = Field(30, ge=1)
    lease_seconds: int = Field(300, ge=2)
    max_attempts: int = Field(3, ge=1)
    max_upload_bytes: int = Field(1 << 30, ge=1)
    """Largest accepted file upload (413 above it, checked while the body streams in)."""
    max_request_body_bytes: int = Field(1 << 20, ge=1024)
    """Largest accepted body of any other request (413 above it): a job's JSON, a worker's report batch,
    a dashboard form."""
    max_artifact_bytes: int = Field(16 << 30, ge=1)
    """Largest checkpoint or adapter a worker may upload to ``/internal/v1`` (413 above it). 16 GiB holds
    a rank-64 LoRA adapter of a 70B model with its optimizer state several times over."""
    request_body_timeout_seconds: float = Field(30.0, gt=0)
    """A request whose body stalls this long (no bytes), or a small body (anything but a file or artifact
    upload) not complete after this long, gets a 408 and its connection is closed. uvicorn itself has no
    such timeout."""
    rate_limit_per_minute: int = Field(600, ge=0)
    """Requests per minute per API key (token bucket, bursts up to the same number); 0 disables it.
    Shared by every API process and replica through Redis (``IPO_REDIS_URL`` or a Redis broker); without
    Redis it is counted in each process, so N uvicorn workers or replicas give a key up to N times this."""
    api_key_cache_seconds: float = Field(2.0, ge=0)
    """How long an API process trusts an API key it has just looked up before looking it up again
    (``app.auth.KeyCache``): a revoked key is refused by every process at most this long after the
    revocation. 0 looks every request's key up in the database."""
    max_gpus_per_job: int = Field(8, ge=1)
    """Largest ``n_gpus`` a job may ask for (400 above it): 8, the GPUs of the largest common single host
    (DGX/HGX nodes); a job is never spread over several hosts (docs/multi-gpu.md)."""
    max_active_jobs: int = Field(8, ge=0)
    """Most jobs a project may have validating, queued, running or paused at once (429 above); 0 disables it."""
    db_pool_size: int = Field(20, ge=1)
    """Database connections per API process, kept open (no overflow: ``app.db.make_engine``). 20 is the
    most the API used to open at once (10 pooled + 10 overflow, re-opened per request under load)."""
    dispatch_interval_seconds: float = Field(1.0, gt=0)
    """How often the dispatcher loop sends pending outbox rows, re-dispatches lost jobs and reaps leases."""
    redispatch_after_seconds: int = Field(60, ge=1)
    """A job still ``queued`` this long after its message was sent is dispatched again (lost message); later
    rings wait as long as the job has queued, up to 10x this (``app.services.dispatch.next_redispatch``)."""
    run_dispatcher: bool = True
    """Run the outbox dispatcher/reaper loop inside the API process."""
    log_level: str = "INFO"
    """Root log level (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``)."""
    log_format: LogFormat = "auto"
    """``json`` (one object per line), ``text`` (for people), or ``auto``: text when stderr is a terminal."""
    dashboard_session_seconds: int = Field(12 * 3600, ge=60)
    """How long a dashboard login lasts (server-side; logging out ends it at once)."""

    inference_url: str = "http://127.0.0.1:8001"
    """Where ``POST /v1/chat/completions`` is forwarded: the embedded inference server (``ipo inference``,
    started by ``ipo up`` on the API's port + 1) or a vLLM OpenAI-compatible server with LoRA enabled."""
    adapters_dir: Path | None = None
    """Unpacked adapters and checkpoints the inference server loads by path (``POST /v1/load_lora_adapter``).
    Default ``{var_dir}/adapters``. The inference server (or vLLM container) must see it at the same path."""
    chat_max_tokens: int = Field(2048, ge=1)
    """Largest ``max_tokens`` / ``max_completion_tokens`` of a chat completion (400 above it)."""
    inference_timeout_seconds: float = Field(300.0, gt=0)
    """How long the API waits for the inference server's answer, or for its next streamed chunk (the
    server bounds each reply itself: ``IPO_INFERENCE_TIMEOUT_SECONDS``)."""

    run_webhook_sender: bool = True
    """Run the webhook delivery loop inside the API process (several replicas may all run it)."""
    webhook_allow_loopback: bool = False
    """Accept webhook URLs that resolve to loopback addresses (tests, a laptop). Every other non-global
    address (private, link-local, CGNAT...) needs ``webhook_allowed_networks``."""
    webhook_allowed_networks: Annotated[list[IPvAnyNetwork], NoDecode] = []
    """CIDRs that webhook targets may resolve to besides global addresses, e.g. ``10.0.8.0/24`` where
    your receivers live; comma-separated in ``IPO_WEBHOOK_ALLOWED_NETWORKS``. Empty by default: private,
    link-local and other non-global ranges are refused (``app.services.webhook_targets``)."""
    mlflow_allowed_uris: Annotated[list[str], NoDecode] = list(DEFAULT_ALLOWED_TRACKING_URIS)
    """Where a job's ``integrations[].mlflow.tracking_uri`` may point: comma-separated ``*`` or
    ``http(s)://host[:port][/path]`` prefixes (``*.corp.example`` for subdomains; no port = any port) in
    ``IPO_MLFLOW_ALLOWED_URIS``. Default: an MLflow server on loopback (``http://127.0.0.1``, ``localhost``,
    ``[::1]``, any port), so local use works and a tenant cannot make workers call internal hosts (SSRF);
    list your tracking servers on a shared service. Others are a 400 at creation; the worker checks again
    with its own setting (``contracts.integrations.tracking_uri_allowed``)."""
    webhook_timeout_seconds: float = Field(5.0, gt=0)
    """Per-attempt timeout of a webhook delivery (connect + response)."""
    webhook_retry_base_seconds: float = Field(5.0, gt=0)
    """Retry backoff unit: retries wait 1, 6, 24, 120 and 720 times this (5 s, 30 s, 2 min, 10 min, 1 h),
    then the delivery is marked failed."""
    webhook_max_attempts: int = Field(6, ge=1, le=20)
    """Attempts per delivery (the first + retries) before it is marked failed; past the fifth retry each
    further one waits as long as the fifth."""
    webhook_failing_after: int = Field(5, ge=1)
    """An endpoint whose last this-many delivery attempts all failed is marked ``failing``."""
    webhook_poll_seconds: float = Field(1.0, gt=0)
    """How often the webhook sender looks for due deliveries."""
    webhook_concurrency: int = Field(4, ge=1)
    """Deliveries in flight at once per API process (a slow receiver holds one slot, not the loop)."""

    @field_validator("webhook_allowed_networks", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("storage_public_endpoint_url")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value or None

    @field_validator("mlflow_allowed_uris", mode="before")
    @classmethod
    def _allowed_uris(cls, value: Any) -> Any:
        return parse_allowed_uris(value)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.var_dir}/ipo.db"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{self.var_dir.resolve()}/storage"

    @property
    def resolved_redis_url(self) -> str | None:
        """Redis for state the API processes share (rate limits): ``IPO_REDIS_URL``, else the broker's URL
        when the broker is Redis, else None (the embedded default: in-process state)."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url and self.broker_url.split("://", 1)[0] in {"redis", "rediss"}:
            return self.broker_url
        return None

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.var_dir / "models"

    @property
    def resolved_adapters_dir(self) -> Path:
        return (self.adapters_dir or self.var_dir / "adapters").resolve()

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    def broker_transport_options(self) -> dict[str, Any]:
        """Folder layout of the embedded filesystem broker (shared with the worker's settings)."""
        if self.broker_url:
            return {}
        return filesystem_transport_options(self.var_dir / "broker")

    def resolved_worker_token(self) -> str:
        if self.worker_token:
            return self.worker_token
        path = self.var_dir / "worker_token"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()


@lru_cache
def get_settings() -> Settings:
    return Settings()
