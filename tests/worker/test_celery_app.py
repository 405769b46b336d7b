"""The Celery app's protocol settings, and a real Celery worker running a job and shutting down warm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.worker.conftest import JOB_ID
from tests.worker.fake_api import TOKEN, FakeApi, State
from worker.celery_app import MAX_TASKS_PER_CHILD, QUEUE, TASK_NAME, app, make_celery

REPO = Path(__file__).resolve().parents[2]


def test_protocol_settings() -> None:
    conf = app.conf
    assert app.main == "ipo"
    assert (TASK_NAME, QUEUE) == ("ipo.run_job", "ipo.jobs")
    assert conf.task_acks_late is False
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_concurrency == 1
    assert conf.worker_max_tasks_per_child == MAX_TASKS_PER_CHILD > 1
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_ignore_result is True
    assert not conf.result_backend
    assert conf.task_default_queue == QUEUE
    app.loader.import_default_modules()
    task = app.tasks[TASK_NAME]
    assert task.ignore_result is True and task.acks_late is False


def test_make_celery_filesystem_broker_sends_to_queue(tmp_path: Path) -> None:
    sender = make_celery("filesystem://", broker_dir=tmp_path / "broker")
    options = sender.conf.broker_transport_options
    assert options["data_folder_in"] == options["data_folder_out"] == str(tmp_path / "broker" / "queue")
    assert TASK_NAME not in sender.tasks  # the API sends by name, without worker code
    sender.send_task(TASK_NAME, kwargs={"job_id": "ftjob-1"}, queue=QUEUE)
    (message,) = list((tmp_path / "broker" / "queue").iterdir())
    assert message.name.endswith(f".{QUEUE}.msg")
    payload = json.loads(message.read_text())
    assert payload["headers"]["task"] == TASK_NAME
    assert payload["content-type"] == "application/json"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError, PermissionError):
                continue
            if text in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


def test_real_worker_runs_job_and_checkpoints_on_warm_shutdown(
    tmp_path: Path, fake_api: FakeApi, api_state: State
) -> None:
    var = tmp_path / "var"
    models = tmp_path / "models" / "tiny-mistral"
    models.mkdir(parents=True)
    (models / "config.json").write_text("{}")
    env = {
        **os.environ,
        "IPO_VAR_DIR": str(var),
        "IPO_API_URL": fake_api.url,
        "IPO_WORKER_TOKEN": TOKEN,
        "IPO_MODELS_DIR": str(tmp_path / "models"),
        "IPO_WORK_DIR": str(tmp_path / "work"),
        "IPO_HEARTBEAT_SECONDS": "0.3",
        "IPO_STOP_GRACE_SECONDS": "5",
        "IPO_TRAINER_MODULE": "tests.worker.fake_trainer",
        "FAKE_STEPS": "100000",
        "FAKE_DELAY": "0.05",
    }
    make_celery("filesystem://", broker_dir=var / "broker").send_task(TASK_NAME, kwargs={"job_id": JOB_ID}, queue=QUEUE)
    log = open(tmp_path / "celery.log", "wb")  # noqa: SIM115 - closed in finally
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO", "-n", "test@%h"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while sum(e["type"] == "metrics" for e in api_state.events) < 3:
            assert time.monotonic() < deadline, (tmp_path / "celery.log").read_text()[-3000:]
            assert worker.poll() is None, (tmp_path / "celery.log").read_text()[-3000:]
            time.sleep(0.05)
        assert _processes_mentioning(str(tmp_path / "work"))  # the trainer runs
        worker.send_signal(signal.SIGTERM)  # warm shutdown, as `docker stop` does
        worker.wait(timeout=20)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
    output = (tmp_path / "celery.log").read_text()
    assert api_state.terminal == [("stopped", {"lease_token": "lease-abc", "reason": "shutdown"})], output[-3000:]
    assert len(api_state.checkpoints) == 1
    assert not _processes_mentioning(str(tmp_path / "work"))


def test_the_pool_child_never_imports_torch() -> None:
    """Why the pool child may serve many jobs: CUDA state lives only in each job's trainer process."""
    code = "import sys, worker.tasks; sys.exit(any(m in sys.modules for m in ('torch', 'transformers', 'trl')))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0
