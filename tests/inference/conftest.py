"""Inference fixtures: a LoRA adapter really trained on the tiny model (IPO, a few steps, with checkpoints), and
a live inference server process (``python -m inference``) serving the tiny model with that adapter's store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from contracts.archive import zip_dir
from ipo_cli.processes import free_port, stop_group, wait_http_ok

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_CONCURRENT = 2
MAX_ADAPTERS = 2


@dataclass(frozen=True)
class TrainedRun:
    adapter: Path
    """The final adapter (PEFT weights + config + tokenizer), as the job's result file holds it."""
    checkpoints: dict[int, Path]
    """Step -> checkpoint directory (adapter weights + trainer state)."""
    train_file: Path


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "tiny-mistral"


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """Four IPO steps on the demo data with a high learning rate, so the adapter visibly moves the model;
    checkpoints at steps 2 and 4 are copied out as they are reported."""
    from contracts.method import Method
    from worker.training.demo_data import write_demo_data
    from worker.training.reporter import ListReporter
    from worker.training.request import EXIT_OK, TrainRequest
    from worker.training.run import train

    root = tmp_path_factory.mktemp("trained")
    train_file, _valid_file = write_demo_data(root / "data", seed=0)
    kept = root / "kept"

    class Keeping(ListReporter):
        def checkpoint(self, step: int, path: str, metrics: dict[str, object] | None = None) -> None:
            shutil.copytree(path, kept / f"checkpoint-{step}")
            super().checkpoint(step, path, metrics)

    reporter = Keeping()
    hp = {"max_steps": 4, "checkpoint_every": 2, "batch_size": 4, "beta": 0.1, "learning_rate": 0.02}
    request = TrainRequest(
        job_id="job-inference",
        attempt=1,
        model_path=str(tiny_model_dir),
        train_file=str(train_file),
        validation_file=None,
        output_dir=str(root / "run"),
        seed=0,
        device="cpu",
        method=Method.model_validate({"type": "ipo", "ipo": {"hyperparameters": hp}}),
    )
    assert train(request, reporter) == EXIT_OK
    adapter = Path(next(r.path for r in reporter.of_kind("artifact") if r.name == "adapter") or "")
    return TrainedRun(
        adapter=adapter,
        checkpoints={int(p.name.split("-")[1]): p for p in kept.iterdir()},
        train_file=train_file,
    )


@dataclass(frozen=True)
class InferenceServer:
    url: str
    adapters_dir: Path
    log: Path

    def health(self) -> dict[str, object]:
        body: dict[str, object] = httpx.get(f"{self.url}/health", timeout=10).json()
        return body

    def load(self, name: str, source: Path) -> httpx.Response:
        """Copy ``source`` into the adapter store (as the API does) and load it under ``name``."""
        dest = self.adapters_dir / name
        if not dest.exists():
            shutil.copytree(source, dest)
        return httpx.post(
            f"{self.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(dest)}, timeout=60
        )


def start_inference_server(
    models_dir: Path, adapters_dir: Path, log: Path, **env: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    adapters_dir.mkdir(parents=True, exist_ok=True)
    full_env = {
        **os.environ,
        "IPO_MODELS_DIR": str(models_dir),
        "IPO_ADAPTERS_DIR": str(adapters_dir),
        "IPO_DEVICE": "cpu",
        "IPO_LOG_FORMAT": "text",
        **env,
    }
    out = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipo_cli.main", "inference", "--port", str(port)],
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/health", [proc], timeout=120)
    except RuntimeError as exc:
        stop_group(proc, timeout=10)
        raise RuntimeError(f"{exc}: {log.read_text()[-4000:]}") from exc
    return proc, url


@pytest.fixture(scope="session")
def inference_server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    root = tmp_path_factory.mktemp("inference")
    proc, url = start_inference_server(
        tiny_models_dir,
        root / "adapters",
        root / "inference.log",
        IPO_INFERENCE_MAX_CONCURRENT=str(MAX_CONCURRENT),
        IPO_INFERENCE_MAX_ADAPTERS=str(MAX_ADAPTERS),
    )
    try:
        yield InferenceServer(url=url, adapters_dir=root / "adapters", log=root / "inference.log")
    finally:
        stop_group(proc, timeout=15)


WORKER_TOKEN = "inference-worker-token"
WORKER = {"Authorization": f"Bearer {WORKER_TOKEN}"}
CHAT_MAX_TOKENS = 500


@dataclass(frozen=True)
class LiveApi:
    """The API (uvicorn subprocess) forwarding chat completions to ``inference_server``."""

    url: str
    database_url: str

    def new_key(self, project: str) -> str:
        from app.auth import create_key
        from app.db import make_engine, make_sessionmaker

        engine = make_engine(self.database_url)
        with make_sessionmaker(engine)() as session, session.begin():
            _, raw = create_key(session, project)
        engine.dispose()
        return raw


@pytest.fixture(scope="session")
def live_api(
    database_url: str,
    tiny_models_dir: Path,
    inference_server: InferenceServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveApi]:
    from app.migrate import upgrade

    upgrade(database_url)
    root = tmp_path_factory.mktemp("api")
    port = free_port()
    env = {
        **os.environ,
        "IPO_DATABASE_URL": database_url,
        "IPO_VAR_DIR": str(root / "var"),
        "IPO_MODELS_DIR": str(tiny_models_dir),
        "IPO_ADAPTERS_DIR": str(inference_server.adapters_dir),
        "IPO_INFERENCE_URL": inference_server.url,
        "IPO_CHAT_MAX_TOKENS": str(CHAT_MAX_TOKENS),
        "IPO_WORKER_TOKEN": WORKER_TOKEN,
        "IPO_RUN_DISPATCHER": "false",
        "IPO_RUN_WEBHOOK_SENDER": "false",
        "IPO_MAX_ACTIVE_JOBS": "100",
        "IPO_LOG_FORMAT": "text",
    }
    log = root / "api.log"
    out = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipo_cli.main", "serve", "--port", str(port)],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http_ok(f"{url}/healthz", [proc])
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {log.read_text()[-4000:]}") from exc
        yield LiveApi(url=url, database_url=database_url)
    finally:
        stop_group(proc, timeout=15)


@dataclass(frozen=True)
class Project:
    key: str
    fine_tuned_model: str
    checkpoint: str
    """A checkpoint of the finished job."""
    running_checkpoint: str
    """A checkpoint of a job that is still running."""

    def client(self, api: LiveApi) -> OpenAI:
        return OpenAI(base_url=f"{api.url}/v1", api_key=self.key, max_retries=0)


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _upload(worker: httpx.Client, job_id: str, token: str, kind: str, src: Path, tmp: Path, **form: str) -> str:
    archive = zip_dir(src, tmp / f"{job_id}-{kind}-{form.get('step', form.get('name'))}.zip")
    with archive.open("rb") as fh:
        r = worker.post(
            f"/internal/v1/jobs/{job_id}/{kind}",
            headers=WORKER,
            data={"lease_token": token, **form},
            files={"file": (archive.name, fh)},
        )
    body = _ok(r)
    return str(body.get("file_id") or body.get("id"))


@pytest.fixture(scope="session")
def project(live_api: LiveApi, trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    tmp = tmp_path_factory.mktemp("zips")
    key = live_api.new_key("chat-a")
    api = httpx.Client(base_url=live_api.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    worker = httpx.Client(base_url=live_api.url, timeout=60)
    with trained_run.train_file.open("rb") as fh:
        file_id = _ok(api.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", fh)}))["id"]
    jobs = [
        str(_ok(api.post("/v1/fine_tuning/jobs", json={"model": "tiny-mistral", "training_file": file_id}))["id"])
        for _ in range(2)
    ]
    tokens = [
        str(_ok(worker.post(f"/internal/v1/jobs/{j}/claim", headers=WORKER, json={"worker_id": "w"}))["lease_token"])
        for j in jobs
    ]
    for step, path in trained_run.checkpoints.items():
        _upload(worker, jobs[0], tokens[0], "checkpoints", path, tmp, step=str(step), metrics="{}")
    _upload(worker, jobs[1], tokens[1], "checkpoints", trained_run.checkpoints[2], tmp, step="2", metrics="{}")
    adapter = _upload(worker, jobs[0], tokens[0], "artifacts", trained_run.adapter, tmp, name="adapter")
    _ok(
        worker.post(
            f"/internal/v1/jobs/{jobs[0]}/finish",
            headers=WORKER,
            json={"lease_token": tokens[0], "adapter_file_id": adapter, "trained_tokens": 1},
        )
    )
    done = _ok(api.get(f"/v1/fine_tuning/jobs/{jobs[0]}"))
    ckpts = {
        c["step_number"]: c["fine_tuned_model_checkpoint"]
        for c in _ok(api.get(f"/v1/fine_tuning/jobs/{jobs[0]}/checkpoints"))["data"]
    }
    running = _ok(api.get(f"/v1/fine_tuning/jobs/{jobs[1]}/checkpoints"))["data"][0]["fine_tuned_model_checkpoint"]
    assert _ok(api.get(f"/v1/fine_tuning/jobs/{jobs[1]}"))["status"] == "running"
    yield Project(key, str(done["fine_tuned_model"]), str(ckpts[2]), str(running))
    api.close()
    worker.close()
