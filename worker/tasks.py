"""The one Celery task: claim a job over HTTP, stage its inputs, hand it to the supervisor.

``run_job`` is a thin Celery wrapper around :func:`execute_job`, which tests (and ``ipo`` tools) call
directly. Nothing here retries through Celery: a job that could not be started is failed (or left for
the API's reaper when the API itself is unreachable), never re-queued by the worker.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from celery.signals import task_postrun, task_prerun

from contracts.internal import ClaimResponse, DispatchMessage, FailRequest, HeartbeatRequest, StoppedRequest, queue_for
from contracts.logs import log_context, set_log_context
from worker.api_client import ApiClient, ApiError, ApiUnavailable, LeaseLost, NotClaimable
from worker.archive import UnsafeArchive, unzip_safe
from worker.celery_app import TASK_NAME, app
from worker.launcher import DevicePool, DevicesBusy, Reservation, free_port, launch_argv
from worker.settings import WorkerSettings
from worker.shutdown import request_shutdown, set_current
from worker.shutdown import requested as _shutdown
from worker.supervisor import DEFAULT_TRAINER, Outcome, Supervisor
from worker.training.request import TrainRequest

log = logging.getLogger(__name__)


class StartFailure(Exception):
    """The attempt cannot start; ``code``/``retryable`` go to ``/fail``."""

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


@contextmanager
def _shutdown_on_sigterm() -> Iterator[None]:
    """In a pool child SIGTERM means "the worker is shutting down" (forwarded by celery_app)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        request_shutdown()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resolve_model_path(models_dir: Path, model: str) -> Path:
    """``models_dir/model``; must stay inside ``models_dir`` and hold a ``config.json``."""
    root = models_dir.resolve()
    path = (root / model).resolve()
    if root not in path.parents or not (path / "config.json").is_file():
        raise StartFailure("model_not_found", f"Base model {model!r} is not available on this worker.", retryable=False)
    return path


def stage_attempt(api: ApiClient, claim: ClaimResponse, settings: WorkerSettings) -> tuple[Path, Path]:
    """Download inputs into ``work_dir/{job}/attempt-{n}/`` and write ``request.json``. Returns (dir, request)."""
    spec = claim.spec
    model_path = resolve_model_path(settings.models_path, spec.model)
    attempt_dir = settings.work_path / claim.job_id / f"attempt-{claim.attempt}"
    if attempt_dir.exists():  # a leftover from a worker that died mid-staging on this machine
        shutil.rmtree(attempt_dir)
    inputs = attempt_dir / "inputs"
    train_file = api.download_file(spec.training_file, inputs / "train.jsonl")
    validation_file = (
        api.download_file(spec.validation_file, inputs / "validation.jsonl") if spec.validation_file else None
    )
    resume_dir: Path | None = None
    if claim.resume_from is not None:
        archive = api.download(claim.resume_from.download_path, inputs / "resume.zip")
        try:
            resume_dir = unzip_safe(archive, attempt_dir / "resume")
        except UnsafeArchive as exc:
            raise StartFailure(
                "invalid_checkpoint", f"Checkpoint cannot be resumed from: {exc}", retryable=False
            ) from exc
        finally:
            archive.unlink(missing_ok=True)
    parent_dirs: list[str] = []
    for i, parent in enumerate(spec.parents):  # root first: merged into the base in this order
        archive = api.download(parent.download_path, inputs / f"parent-{i}.zip")
        try:
            parent_dirs.append(str(unzip_safe(archive, attempt_dir / "parents" / str(i)).resolve()))
        except UnsafeArchive as exc:
            raise StartFailure(
                "invalid_parent_model", f"The adapter of job {parent.job_id} cannot be used: {exc}", retryable=False
            ) from exc
        finally:
            archive.unlink(missing_ok=True)
    warm_dir: Path | None = None
    if spec.warm_start is not None and resume_dir is None:  # a resume of the job's own checkpoint wins
        archive = api.download(spec.warm_start.download_path, inputs / "warm-start.zip")
        try:
            warm_dir = unzip_safe(archive, attempt_dir / "warm-start")
        except UnsafeArchive as exc:
            raise StartFailure(
                "invalid_checkpoint",
                f"Checkpoint {spec.warm_start.checkpoint_id} cannot be used: {exc}",
                retryable=False,
            ) from exc
        finally:
            archive.unlink(missing_ok=True)
    request = TrainRequest(
        job_id=claim.job_id,
        attempt=claim.attempt,
        model_path=str(model_path),
        train_file=str(train_file.resolve()),
        validation_file=str(validation_file.resolve()) if validation_file else None,
        output_dir=str(attempt_dir.resolve()),
        resume_from=str(resume_dir.resolve()) if resume_dir else None,
        parent_adapters=parent_dirs,
        init_adapter=str(warm_dir.resolve()) if warm_dir else None,
        seed=spec.seed,
        method=spec.method,
        integrations=spec.integrations,
        mlflow_allowed_uris=settings.mlflow_allowed_uris,
        lineage=_lineage(claim),
        device=settings.device,
        cache_dir=str(settings.training_cache_dir.resolve()) if settings.training_cache_dir else None,
        cache_max_bytes=settings.training_cache_max_bytes,
    )
    request_path = attempt_dir / "request.json"
    request_path.write_text(request.model_dump_json(indent=2), encoding="utf-8")
    return attempt_dir, request_path


def _lineage(claim: ClaimResponse) -> dict[str, str]:
    """The job's inputs as tracker tags (``TrainRequest.lineage``); only what is set. ``parent_jobs``: the
    jobs whose adapters this one starts from, root first (``JobSpec.parents``)."""
    spec = claim.spec
    parent = spec.parents[-1] if spec.parents else None
    found = {
        "parent_jobs": ",".join(p.job_id for p in spec.parents),
        "parent_checkpoint": parent.checkpoint_id if parent else None,
        "training_file": spec.training_file,
        "validation_file": spec.validation_file,
        "suffix": spec.suffix,
        "resumed_from_checkpoint": claim.resume_from.checkpoint_id if claim.resume_from else None,
    }
    return {k: v for k, v in found.items() if v}


def execute_job(
    job_id: str,
    settings: WorkerSettings,
    *,
    api: ApiClient | None = None,
    trainer_argv: Sequence[str] = DEFAULT_TRAINER,
    env: Mapping[str, str] | None = None,
    on_supervisor: Callable[[Supervisor], None] | None = None,
) -> Outcome | None:
    """Claim, stage, supervise. Returns None when there was nothing to claim (or staging was cut short).

    Every line logged meanwhile, in this thread or the supervisor's, carries the job id, the worker id
    and, once claimed, the attempt number.
    """
    with log_context(job_id=job_id, attempt=None, worker=settings.worker_id):
        return _execute_job(job_id, settings, api, trainer_argv, env, on_supervisor)


def _execute_job(
    job_id: str,
    settings: WorkerSettings,
    api: ApiClient | None,
    trainer_argv: Sequence[str],
    env: Mapping[str, str] | None,
    on_supervisor: Callable[[Supervisor], None] | None,
) -> Outcome | None:
    message = DispatchMessage(job_id=job_id)
    own_api = api is None
    client = api or ApiClient(
        settings.api_url, settings.resolve_worker_token(), retry_seconds=settings.api_retry_seconds
    )
    try:
        try:
            claim = client.claim(message.job_id, settings.worker_id)
        except NotClaimable as exc:
            log.info("job %s: nothing to claim (%s)", job_id, exc.message)
            return None
        set_log_context(attempt=claim.attempt)  # undone by execute_job's log_context
        log.info("job %s: claimed attempt %d", job_id, claim.attempt)
        try:
            attempt_dir, request_path = stage_attempt(client, claim, settings)
            if _shutdown.is_set():
                client.stopped(job_id, StoppedRequest(lease_token=claim.lease_token, reason="shutdown"))
                return Outcome("stopped", None, "shutdown")
        except StartFailure as exc:
            _fail(client, claim, exc.code, exc.message, retryable=exc.retryable)
            return Outcome("failed", None, exc.code, exc.message)
        except LeaseLost:
            log.warning("job %s: lease lost while staging", job_id)
            return Outcome("lease_lost", None)
        except ApiUnavailable as exc:
            # The lease runs out and the reaper requeues the job; nothing more we can tell the API.
            log.error("job %s: API unreachable while staging: %s", job_id, exc)
            return Outcome("unreported", None, "api_unavailable", str(exc))
        except (ApiError, OSError) as exc:
            _fail(client, claim, "staging_failed", f"Could not prepare the job's inputs: {exc}", retryable=True)
            return Outcome("failed", None, "staging_failed", str(exc))
        try:
            reservation = reserve_devices(client, claim, settings)
        except StartFailure as exc:
            _fail(client, claim, exc.code, exc.message, retryable=exc.retryable)
            return Outcome("failed", None, exc.code, exc.message)
        except LeaseLost:
            log.warning("job %s: lease lost while waiting for devices", job_id)
            return Outcome("lease_lost", None)
        n_gpus = claim.spec.n_gpus
        if reservation is not None:
            env = {**(os.environ if env is None else env), "CUDA_VISIBLE_DEVICES": reservation.cuda_visible_devices}
            log.info("job %s: training on %d device(s): %s", job_id, n_gpus, reservation.cuda_visible_devices)
        if n_gpus > 1:
            trainer_argv = launch_argv(
                trainer_argv, n_gpus, device=settings.device, port=free_port(), config_file=settings.accelerate_config
            )
        supervisor = Supervisor(
            client,
            claim,
            request_path,
            attempt_dir,
            heartbeat_seconds=settings.heartbeat_seconds,
            stop_grace_seconds=settings.stop_grace_seconds,
            trainer_argv=trainer_argv,
            env=env,
            n_processes=n_gpus,
        )
        set_current(supervisor)
        if on_supervisor is not None:
            on_supervisor(supervisor)
        try:
            if _shutdown.is_set():
                supervisor.shutdown()
            outcome = supervisor.run()
        finally:
            set_current(None)
            if reservation is not None:
                reservation.release()
        if outcome.status in ("succeeded", "stopped") and not settings.keep_work_dirs:
            shutil.rmtree(attempt_dir, ignore_errors=True)  # everything worth keeping was uploaded
        return outcome
    finally:
        if own_api:
            client.close()


def reserve_devices(api: ApiClient, claim: ClaimResponse, settings: WorkerSettings) -> Reservation | None:
    """The job's ``n_gpus`` devices from this host's pool (``worker/launcher.py``), waiting up to
    ``IPO_DEVICE_WAIT_SECONDS`` while other jobs hold them, heartbeating meanwhile so the lease holds.

    None for a worker that declares no devices (``IPO_WORKER_GPUS`` unset) and a one-device job: it trains
    on whatever device the worker has, as before. Raises ``StartFailure`` (retryable: another worker may
    take the job) when the worker has fewer devices than the job asks for (``not_enough_devices``: a queue
    consumed by the wrong worker) or they stay busy (``devices_busy``); ``LeaseLost`` from a heartbeat.
    """
    n = claim.spec.n_gpus
    declared = settings.devices
    if not declared and n == 1:
        return None
    if n > len(declared):
        raise StartFailure(
            "not_enough_devices",
            f"The job trains on {n} devices, but worker {settings.worker_id} declares {len(declared)} "
            f"(IPO_WORKER_GPUS={settings.worker_gpus or ''}); it should not consume queue "
            f"{queue_for(settings.queue, n)}.",
            retryable=True,
        )
    last_beat = [time.monotonic()]

    def keep_lease() -> None:
        if time.monotonic() - last_beat[0] >= (settings.heartbeat_seconds or claim.heartbeat_seconds):
            api.heartbeat(claim.job_id, HeartbeatRequest(lease_token=claim.lease_token), retry_seconds=5)
            last_beat[0] = time.monotonic()

    assert settings.device_lock_dir is not None  # derived from var_dir
    pool = DevicePool(declared, settings.device_lock_dir)
    try:
        return pool.reserve(n, wait_seconds=settings.device_wait_seconds, while_waiting=keep_lease)
    except DevicesBusy as exc:
        raise StartFailure("devices_busy", f"{exc}; the job is queued again.", retryable=True) from exc


def _fail(client: ApiClient, claim: ClaimResponse, code: str, message: str, *, retryable: bool) -> None:
    try:
        client.fail(
            claim.job_id,
            FailRequest(lease_token=claim.lease_token, code=code, message=message[:4000], retryable=retryable),
        )
    except (ApiError, ApiUnavailable) as exc:
        log.error("job %s: could not report failure %s: %s", claim.job_id, code, exc)


@app.task(name=TASK_NAME, ignore_result=True, acks_late=False, shared=False)
def run_job(job_id: str) -> dict[str, Any] | None:
    """The Celery entry point (kwargs ``{"job_id": ...}``, validated as ``DispatchMessage``)."""
    settings = WorkerSettings()
    _shutdown.clear()
    with _shutdown_on_sigterm():
        outcome = execute_job(job_id, settings, trainer_argv=(sys.executable, "-m", settings.trainer_module))
    return None if outcome is None else {"status": outcome.status, "reason": outcome.reason}


@task_prerun.connect
def _bind_job_id(sender: Any = None, kwargs: Mapping[str, Any] | None = None, **_: Any) -> None:
    """Celery's own lines about the task (``succeeded``, ``raised unexpected``) carry the job id too."""
    if getattr(sender, "name", None) == TASK_NAME:
        set_log_context(job_id=(kwargs or {}).get("job_id"))


@task_postrun.connect
def _unbind_job_id(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) == TASK_NAME:
        set_log_context(job_id=None)
