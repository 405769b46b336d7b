"""API fixtures: a migrated database, a TestClient, two projects' keys, and a recording doorbell.

The doorbell here only records which jobs were rung; the real Celery path is exercised by the
end-to-end tests (tests/e2e), which run a real worker.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.auth import create_key
from app.db import make_engine, make_sessionmaker
from app.main import create_app
from app.migrate import upgrade
from app.settings import Settings


class RecordingDoorbell:
    def __init__(self) -> None:
        self.rung: list[str] = []
        self.devices: dict[str, int] = {}
        """The ``n_gpus`` each job's last doorbell asked for (which queue it went to)."""

    def ring(self, job_id: str, n_gpus: int = 1) -> None:
        self.rung.append(job_id)
        self.devices[job_id] = n_gpus


@pytest.fixture(scope="session")
def migrated_url(database_url: str) -> str:
    upgrade(database_url)
    return database_url


@pytest.fixture
def settings(migrated_url: str, tmp_path: Path) -> Settings:
    models = tmp_path / "models"
    (models / "tiny-mistral").mkdir(parents=True)
    (models / "tiny-mistral" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    return Settings(
        var_dir=tmp_path / "var",
        database_url=migrated_url,
        models_dir=models,
        worker_token="worker-secret",
        run_dispatcher=False,
        run_webhook_sender=False,
        max_upload_bytes=200_000,
        lease_seconds=60,
        max_attempts=2,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, doorbell=RecordingDoorbell())) as c:
        yield c


def _key(settings: Settings, project: str) -> str:
    engine = make_engine(settings.resolved_database_url)
    with make_sessionmaker(engine)() as session, session.begin():
        _, raw = create_key(session, project)
    engine.dispose()
    return raw


@pytest.fixture
def auth(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {_key(settings, 'alpha-' + secrets.token_hex(4))}"}


@pytest.fixture
def other_auth(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {_key(settings, 'beta-' + secrets.token_hex(4))}"}


WORKER = {"Authorization": "Bearer worker-secret"}


def pref_line(i: int) -> str:
    return json.dumps(
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus 1?"}],
            "chosen": [{"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}],
            "rejected": [{"role": "assistant", "content": f"{i} plus 1 is {i + 3}."}],
        }
    )


@pytest.fixture
def good_jsonl() -> bytes:
    return ("\n".join(pref_line(i) for i in range(8)) + "\n").encode()


@pytest.fixture
def upload(client: TestClient, auth: dict[str, str], good_jsonl: bytes):
    def _upload(content: bytes = good_jsonl, name: str = "train.jsonl", headers: dict[str, str] | None = None):
        return client.post(
            "/v1/files", headers=headers or auth, files={"file": (name, content)}, data={"purpose": "fine-tune"}
        )

    return _upload
