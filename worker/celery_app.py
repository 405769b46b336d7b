"""The Celery app: a doorbell, not a ledger (docs/design.md, "The worker protocol").

Start a worker (one per GPU) with ``celery -A worker.celery_app worker`` (``ipo worker`` wraps it).
The message only names a job; the claim over ``/internal/v1`` decides who runs it, so messages are
acked early, results are ignored and redelivery is relied on for nothing.

The API sends with ``send_task(TASK_NAME, kwargs={"job_id": ...}, queue=IPO_QUEUE)``; both names live in
``contracts`` (``app`` must not import ``worker``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_shutting_down
from celery.worker import state as worker_state

from contracts.broker import FILESYSTEM_BROKER, filesystem_transport_options
from contracts.internal import DEFAULT_QUEUE, TASK_NAME
from contracts.logs import configure_logging, resolve_format
from worker.settings import WorkerSettings
from worker.shutdown import request_shutdown

log = logging.getLogger(__name__)

APP_NAME = "ipo"
QUEUE = DEFAULT_QUEUE  # the default; IPO_QUEUE overrides it on both sides


MAX_TASKS_PER_CHILD = 100
"""Jobs a pool child supervises before Celery replaces it."""


def celery_config(broker_url: str, transport_options: dict[str, Any], queue: str = QUEUE) -> dict[str, Any]:
    """Every setting the protocol relies on, in one place (asserted by tests/worker/test_celery_app.py)."""
    return {
        "broker_url": broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": queue,
        "task_routes": {TASK_NAME: {"queue": queue}},
        # Early ack: a message is a doorbell; a lost one is re-sent by the API's outbox sweeper, and a
        # duplicate finds nothing to claim. Late acks would re-run jobs whose worker died mid-training.
        "task_acks_late": False,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,  # one GPU, one job
        # Every job already gets a fresh *trainer* process (the supervisor spawns it; CUDA lives there and
        # the pool child never imports torch), so the pool child is kept warm between jobs: recycling it
        # after each job left a just-finished worker unable to take the next one for ~4 s
        # (bench/dispatch_latency.py). It is still recycled now and then to bound any slow leak.
        "worker_max_tasks_per_child": MAX_TASKS_PER_CHILD,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "worker_hijack_root_logger": False,
    }


def make_celery(
    broker_url: str | None = None,
    *,
    broker_dir: Path | None = None,
    include_tasks: bool = False,
    create_dirs: bool = True,
) -> Celery:
    """A configured app. The API uses it to send (``include_tasks=False``); the worker to consume.

    For ``filesystem://`` both sides must point at the same ``broker_dir`` (default ``{IPO_VAR_DIR}/broker``).
    """
    settings = WorkerSettings()
    url = broker_url or settings.broker_url
    if url.startswith(FILESYSTEM_BROKER):
        options = filesystem_transport_options(broker_dir or settings.broker_dir, create=create_dirs)
    else:
        options = {}
    celery = Celery(APP_NAME, include=["worker.tasks"] if include_tasks else [])
    celery.conf.update(celery_config(url, options, settings.queue))
    return celery


def worker_argv(settings: WorkerSettings, extra_args: list[str] | None = None) -> list[str]:
    """The ``celery worker`` arguments of ``ipo worker``: the queues of every job size the worker's declared
    devices fit (``WorkerSettings.queues``: ``IPO_QUEUE`` and ``IPO_QUEUE.gpus-N`` up to ``IPO_WORKER_GPUS``),
    one job at a time in one warm prefork child."""
    # No ASCII-art banner on stdout when the logs are JSON: log collectors read both streams.
    quiet = ["--quiet"] if resolve_format(settings.log_format) == "json" else []
    return [
        *quiet,
        "worker",
        f"--loglevel={settings.log_level.upper()}",
        f"--queues={','.join(settings.queues)}",
        "--concurrency=1",
        "--pool=prefork",
        "--without-gossip",
        "--without-mingle",
        f"--hostname=ipo-{settings.worker_id.replace(':', '-')}@%h",
        *(extra_args or []),
    ]


def run_worker(extra_args: list[str] | None = None) -> None:
    """``ipo worker``: one Celery worker process consuming ``IPO_QUEUE`` (and, when it declares N devices,
    the queues of 2- to N-device jobs), one job at a time (:func:`worker_argv`).

    prefork with one warm child that supervises one job at a time; each job trains in a fresh trainer
    process, so no CUDA context or allocator state leaks from one job into the next.
    """
    app.worker_main(worker_argv(WorkerSettings(), extra_args))


app = make_celery(include_tasks=True, create_dirs=False)


@setup_logging.connect
def _configure_logging(**_: Any) -> None:
    """Our handler and formatter on the root logger (``IPO_LOG_LEVEL``, ``IPO_LOG_FORMAT``), however the
    worker was started (``ipo worker`` or ``celery -A worker.celery_app worker``). With a receiver on this
    signal Celery configures no logging of its own: no handlers, no stdout redirection."""
    settings = WorkerSettings()
    configure_logging(settings.log_level, settings.log_format)


@worker_init.connect
def _create_broker_dirs(**_: Any) -> None:
    """The filesystem transport's folders, created when a worker starts rather than on import."""
    options = app.conf.broker_transport_options or {}
    for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        if key in options:
            Path(options[key]).mkdir(parents=True, exist_ok=True)


@worker_shutting_down.connect
def _forward_shutdown(sig: str | None = None, how: str | None = None, **_: Any) -> None:
    """Runs in the worker's main process on SIGTERM/SIGINT/SIGQUIT: tell running jobs to checkpoint and stop.

    The task runs in a pool child that Celery's warm shutdown just waits for; SIGTERM makes that child's
    task call :meth:`Supervisor.shutdown` (see ``worker.tasks``), which saves a checkpoint, reports
    ``stopped`` (reason ``shutdown``) and returns, letting the warm shutdown complete.
    """
    if request_shutdown():  # the solo pool runs the task in this very process
        return
    for request in list(worker_state.active_requests):
        pid = getattr(request, "worker_pid", None)
        if pid and pid != os.getpid():
            log.info("worker %s shutdown (%s): asking task process %d to checkpoint and stop", how, sig, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
