"""``ipo up | serve | dispatcher | worker | migrate``: run the parts of the service.

``ipo up`` is the embedded default in one command: SQLite, the Celery filesystem transport and a
local artifact directory under ``./var``, the API (with its dispatcher) and one worker process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from ipo_cli.processes import stop_group

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's own variable: where each process writes its counters and histograms (mmap files)."""

Host = Annotated[str, typer.Option(help="Interface to bind.")]
Port = Annotated[int, typer.Option(help="TCP port.")]


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("serve")(serve)
    app.command("dispatcher")(dispatcher)
    app.command("worker")(worker)
    app.command("migrate")(migrate)
    app.command("inference")(inference)


def migrate() -> None:
    """Apply database migrations (alembic upgrade head). A SQLite file and its folder are created.
    Exit 4 when the database is unreachable, 5 when it does not exist (Postgres) or is newer than this code."""
    from app.settings import Settings
    from ipo_cli.database import migrate_database

    typer.echo(migrate_database(Settings()))


def serve(
    host: Host = "127.0.0.1",
    port: Port = 8000,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Run the API server (uvicorn). With ``--workers N`` the N processes act as one service: one of them
    leads the dispatcher/reaper/webhook loops, the rate limit is shared through Redis, and ``/metrics``
    sums every process's counters (``PROMETHEUS_MULTIPROC_DIR``, made here when unset)."""
    import uvicorn

    from app.settings import Settings
    from contracts.logs import configure_logging, logging_config
    from ipo_cli.database import ready_database_url

    settings = Settings()
    ready_database_url(settings)  # a one-line reason now, not a traceback at the first request
    configure_logging(settings.log_level, settings.log_format)
    metrics_dir = prepare_metrics_dir(workers)
    try:
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            # Applied again in each worker process: uvicorn's lines go through our formatter too.
            log_config=logging_config(settings.log_level, settings.log_format),
            access_log=False,  # app.middleware.request_log writes the access log, with the request id
            timeout_graceful_shutdown=10,
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


DISPATCHER_POOL_SIZE = 4
"""Database connections of an ``ipo dispatcher`` process: its two loops use one each, plus headroom."""


def dispatcher() -> None:
    """Run the singleton loops (outbox dispatcher + lease reaper, webhook sender) in a process of their own,
    until SIGTERM or Ctrl-C. For API replicas run with ``IPO_RUN_DISPATCHER=false`` and
    ``IPO_RUN_WEBHOOK_SENDER=false``, so request bursts and doorbells do not share a process. Several may
    run: one leads (Postgres advisory lock), the others take over within seconds when it stops."""
    import threading

    from app.db import make_engine, make_sessionmaker
    from app.leader_loops import LeaderLoops
    from app.settings import Settings
    from contracts.logs import configure_logging
    from ipo_cli.database import ready_database_url

    settings = Settings()
    ready_database_url(settings)
    configure_logging(settings.log_level, settings.log_format)
    engine = make_engine(settings.resolved_database_url, DISPATCHER_POOL_SIZE)
    loops = LeaderLoops(make_sessionmaker(engine), settings, threading.Event(), dispatcher=True, webhooks=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    loops.start()
    typer.echo("ipo dispatcher: running the dispatcher, reaper and webhook sender (leader when it holds the lock)")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        loops.stop()
        engine.dispose()
        typer.echo("ipo dispatcher: stopped (the leader lock, if held, is released)")


def prepare_metrics_dir(workers: int) -> Path | None:
    """Make ``PROMETHEUS_MULTIPROC_DIR`` ready before ``workers`` API processes start.

    Set: its ``*.db`` files (a previous run's counts, under pids that may be reused) are deleted, and the
    directory is created if missing. Unset with ``workers > 1``: a fresh temporary directory is made and
    exported, so ``/metrics`` sums every process's counters whichever process answers the scrape. Returns
    the directory it made (the caller removes it when the server exits), else None.

    Runs before anything in this process imports ``prometheus_client`` (``app.services.metrics`` creates
    its metrics' files at import): with one worker, uvicorn serves from this very process.
    """
    current = os.environ.get(METRICS_DIR_ENV)
    if current:
        directory = Path(current)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink(missing_ok=True)
        return None
    if workers <= 1:
        return None
    made = Path(tempfile.mkdtemp(prefix="ipo-prometheus-"))
    os.environ[METRICS_DIR_ENV] = str(made)
    return made


def inference(host: Host = "127.0.0.1", port: Port = 8001) -> None:
    """Run the embedded inference server (OpenAI-compatible chat completions on a base model + LoRA adapters)."""
    from inference.server import run

    run(host=host, port=port)


def worker() -> None:
    """Run one Celery worker (one per GPU): concurrency 1, one task per child process."""
    from contracts.logs import configure_logging
    from worker.celery_app import run_worker
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    configure_logging(settings.log_level, settings.log_format)
    run_worker()


def up(
    host: Host = "127.0.0.1",
    port: Port = 8000,
    inference: Annotated[
        bool, typer.Option(help="Also start the embedded inference server (chat completions) on port + 1.")
    ] = True,
) -> None:
    """Start everything, embedded: schema, a local API key, the API + dispatcher, one worker, and the
    inference server for ``/v1/chat/completions`` (when a base model is installed)."""
    from app.bootstrap import bootstrap
    from app.services.models_registry import list_base_models
    from app.settings import Settings
    from contracts.logs import configure_logging
    from ipo_cli.database import database_errors, migrate_database

    settings = Settings()
    migrate_database(settings)  # as always, `ipo up` migrates; a database it cannot use is a one-line reason
    configure_logging(settings.log_level, settings.log_format)
    with database_errors():
        key, created = bootstrap(settings)
    env = {**os.environ, "IPO_API_URL": os.environ.get("IPO_API_URL", f"http://{host}:{port}")}
    worker_proc = subprocess.Popen([sys.executable, "-m", "ipo_cli.main", "worker"], env=env, start_new_session=True)
    children = [worker_proc]
    if inference and "IPO_INFERENCE_URL" not in os.environ:
        if list_base_models(settings.resolved_models_dir):
            inference_proc = subprocess.Popen(
                [sys.executable, "-m", "ipo_cli.main", "inference", "--host", host, "--port", str(port + 1)],
                env=env,
                start_new_session=True,
            )
            children.append(inference_proc)
            os.environ["IPO_INFERENCE_URL"] = f"http://{host}:{port + 1}"
            typer.echo(f"inference server at http://{host}:{port + 1}  (pid {inference_proc.pid})")
        else:
            typer.echo("no base model yet (ipo models build-tiny): chat completions stay off until `ipo up` again")
    typer.echo(f"ipo-align is up at http://{host}:{port}  (worker pid {worker_proc.pid})")
    typer.echo(
        f"API key {'created' if created else 'in'} {settings.var_dir / 'api_key'}" + (f": {key}" if created else "")
    )
    # uvicorn re-raises SIGTERM once it has shut down; turn it into SystemExit so the children are
    # stopped below instead of being orphaned when this process dies of the signal.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        serve(host=host, port=port, workers=1)
    finally:
        for child in reversed(children):
            stop_group(child, timeout=90)
