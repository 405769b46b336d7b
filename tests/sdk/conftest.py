"""A live API server (uvicorn, real socket) on a loopback port, for driving with the official openai SDK.

The server runs as a subprocess on this test run's database (migrated here), with its own var dir and
a models directory holding only ``tiny-mistral/config.json`` (enough for the allow-list; nothing trains).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.auth import create_key
from app.db import make_engine, make_sessionmaker
from app.migrate import upgrade
from ipo_cli.processes import free_port, wait_http_ok

WORKER_TOKEN = "sdk-worker-token"
MAX_UPLOAD_BYTES = 300_000
BODY_TIMEOUT_SECONDS = 5
"""IPO_REQUEST_BODY_TIMEOUT_SECONDS of the live server: short, so a stalled body's 408 comes quickly."""


@dataclass(frozen=True)
class LiveServer:
    url: str
    database_url: str
    var_dir: Path

    def new_key(self, project: str | None = None) -> str:
        engine = make_engine(self.database_url)
        with make_sessionmaker(engine)() as session, session.begin():
            _, raw = create_key(session, project or f"sdk-{secrets.token_hex(4)}")
        engine.dispose()
        return raw

    def worker(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def stored_blobs(self) -> list[Path]:
        store = self.var_dir / "storage"
        return [p for p in store.rglob("*") if p.is_file()] if store.exists() else []


@pytest.fixture(scope="session")
def live_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(database_url, tmp_path_factory.mktemp("live")) as server:
        yield server


@contextmanager
def serve(database_url: str, root: Path, **settings: str) -> Iterator[LiveServer]:
    """``uvicorn app.main:create_app`` on a free loopback port, on ``database_url`` (migrated here), with its
    var dir and models under ``root``; ``settings`` are more ``IPO_*`` variables (``storage_url="s3://..."``
    sets ``IPO_STORAGE_URL``). The environment is this process's, so the AWS SDK variables pass through."""
    upgrade(database_url)
    models = root / "models"
    (models / "tiny-mistral").mkdir(parents=True)
    (models / "tiny-mistral" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    port = free_port()
    env = {
        **os.environ,
        "IPO_DATABASE_URL": database_url,
        "IPO_VAR_DIR": str(root / "var"),
        "IPO_MODELS_DIR": str(models),
        "IPO_WORKER_TOKEN": WORKER_TOKEN,
        "IPO_RUN_DISPATCHER": "false",
        "IPO_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "IPO_MAX_ACTIVE_JOBS": "100",
        "IPO_REQUEST_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT_SECONDS),
        **{f"IPO_{name.upper()}": value for name, value in settings.items()},
    }
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http_ok(f"{url}/healthz", [proc])
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {(root / 'server.log').read_text()[-4000:]}") from exc
        yield LiveServer(url=url, database_url=database_url, var_dir=root / "var")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
