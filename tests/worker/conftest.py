"""Worker fixtures: a real loopback HTTP server playing the API, a base-model dir and worker settings."""

from __future__ import annotations

import io
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from tests.worker.fake_api import TOKEN, FakeApi, State
from worker.api_client import ApiClient
from worker.settings import WorkerSettings

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
TRAINER_ARGV = (sys.executable, str(FAKE_TRAINER))
JOB_ID = "ftjob-test1"


def claim_body(*, attempt: int = 1, resume: bool = False, heartbeat_seconds: int = 30) -> dict[str, Any]:
    body: dict[str, Any] = {
        "job_id": JOB_ID,
        "attempt": attempt,
        "lease_token": "lease-abc",
        "lease_seconds": 300,
        "heartbeat_seconds": heartbeat_seconds,
        "spec": {
            "job_id": JOB_ID,
            "model": "tiny-mistral",
            "training_file": "file-train",
            "validation_file": "file-valid",
            "seed": 7,
            "method": {"type": "ipo"},
        },
        "resume_from": None,
    }
    if resume:
        body["resume_from"] = {
            "checkpoint_id": "ckpt-9",
            "step": 3,
            "download_path": "/internal/v1/checkpoints/ckpt-9/content",
        }
    return body


def checkpoint_zip(step: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("trainer_state.json", f'{{"global_step": {step}}}')
        zf.writestr("adapter_model.safetensors", b"w")
    return buffer.getvalue()


@pytest.fixture
def api_state() -> State:
    state = State(claim=claim_body())
    state.files["file-train"] = b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    state.files["file-valid"] = b'{"prompt": "q", "chosen": "c", "rejected": "d"}\n'
    state.files["/internal/v1/checkpoints/ckpt-9/content"] = checkpoint_zip(3)
    return state


@pytest.fixture
def fake_api(api_state: State) -> Iterator[FakeApi]:
    server = FakeApi(api_state)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(tmp_path: Path, fake_api: FakeApi) -> WorkerSettings:
    models = tmp_path / "models"
    (models / "tiny-mistral").mkdir(parents=True)
    (models / "tiny-mistral" / "config.json").write_text("{}")
    return WorkerSettings(
        var_dir=tmp_path / "var",
        api_url=fake_api.url,
        worker_token=SecretStr(TOKEN),
        models_dir=models,
        work_dir=tmp_path / "work",
        heartbeat_seconds=0.3,
        stop_grace_seconds=3,
        worker_id="test-worker",
        keep_work_dirs=True,
    )


@pytest.fixture
def api(fake_api: FakeApi) -> Iterator[ApiClient]:
    client = ApiClient(fake_api.url, TOKEN, retry_seconds=20, backoff_initial=0.1, backoff_max=1.0)
    try:
        yield client
    finally:
        client.close()
