"""A live stack for end-to-end tests: ``ipo serve`` (uvicorn) and ``ipo worker`` (Celery) as real
processes on this run's database and broker (Redis db + queue of its own in CI, else the embedded
filesystem transport), with the tiny model in a models directory."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.auth import create_key
from app.db import make_engine, make_sessionmaker
from app.migrate import upgrade
from ipo_cli.processes import free_port, stop_group, wait_http_ok
from tests.conftest import fresh_database


@dataclass
class Stack:
    url: str
    api_key: str
    env: dict[str, str]
    var_dir: Path
    models_dir: Path
    logs: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ipo_cli.main", *cmd],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture(scope="module")
def stack(
    redis_url: str | None, queue_name: str, tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    # A database of its own: other suites leave queued jobs behind that this stack's dispatcher would send.
    with fresh_database(tmp_path_factory.mktemp("db"), "ipo_e2e") as database_url:
        yield from _stack(database_url, redis_url, queue_name, tiny_models_dir, tmp_path_factory)


def _stack(
    database_url: str,
    redis_url: str | None,
    queue_name: str,
    tiny_models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """The stack on ``database_url``; ``extra_env`` is added to the API's and the worker's environment."""
    upgrade(database_url)
    var = tmp_path_factory.mktemp("var")
    logs = tmp_path_factory.mktemp("logs")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "IPO_DATABASE_URL": database_url,
        "IPO_VAR_DIR": str(var),
        "IPO_MODELS_DIR": str(tiny_models_dir),
        "IPO_WORKER_TOKEN": "e2e-worker-token",
        "IPO_API_URL": url,
        "IPO_QUEUE": queue_name,
        "IPO_HEARTBEAT_SECONDS": "2",
        "IPO_DISPATCH_INTERVAL_SECONDS": "0.5",
        "IPO_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    if redis_url:
        env["IPO_BROKER_URL"] = redis_url
    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as session, session.begin():
        _, key = create_key(session, f"e2e-{port}")
    engine.dispose()
    api = start(["serve", "--port", str(port)], env, logs / "api.log")
    worker = start(["worker"], env, logs / "worker.log")
    try:
        try:
            wait_http_ok(f"{url}/readyz", [api, worker])
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; logs in {logs}") from exc
        yield Stack(url=url, api_key=key, env=env, var_dir=var, models_dir=tiny_models_dir, logs=logs)
    finally:
        stop_group(worker, 90)
        stop_group(api)
