"""A live stack for fault injection: ``ipo serve`` and any number of ``ipo worker`` processes on a
private Postgres and a private Redis (tests/reliability/services.py), with protocol timings shrunk to
seconds. Each test gets its own database, queue and var dir; the servers are shared by the session.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from app.auth import create_key
from app.migrate import upgrade
from app.models import Checkpoint, Job, JobEvent, OutboxMessage
from tests.reliability.services import ThrowawayPostgres, ThrowawayRedis, free_port
from worker.training.demo_data import write_demo_data

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")

FAST_PROTOCOL = {
    "IPO_HEARTBEAT_SECONDS": "1",
    "IPO_LEASE_SECONDS": "4",
    "IPO_DISPATCH_INTERVAL_SECONDS": "0.3",
    "IPO_REDISPATCH_AFTER_SECONDS": "3",
    "IPO_STOP_GRACE_SECONDS": "10",
    "IPO_MAX_ATTEMPTS": "3",
}


@pytest.fixture(scope="session")
def pg() -> Iterator[ThrowawayPostgres]:
    server = ThrowawayPostgres()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


def wait_for(what: str, check: Callable[[], T | Literal[False] | None], timeout: float, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # the database or API may be down on purpose
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still alive (zombies count as gone)."""
    for p in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error):
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


@dataclass
class Stack:
    pg: ThrowawayPostgres
    redis: ThrowawayRedis
    db_url: str
    env: dict[str, str]
    root: Path
    port: int
    api_key: str
    queue: str
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _train_file: str | None = None
    _restarts: int = 0

    def __post_init__(self) -> None:
        self.engine = create_engine(self.db_url, poolclass=NullPool, connect_args={"connect_timeout": 3})
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    # ---- processes ----

    def _spawn(self, args: list[str], log: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.logs / log).open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "ipo_cli.main", *args],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_api(self, **env: str) -> None:
        self.api = self._spawn(["serve", "--port", str(self.port)], "api.log", {**self.env, **env})
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> float:
        started = time.monotonic()

        def ready() -> bool:
            assert self.api is not None and self.api.poll() is None, f"API exited; see {self.logs}/api.log"
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200

        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"API not ready after {timeout}s; see {self.logs}/api.log")
            time.sleep(0.1)

    def kill_api(self) -> None:
        assert self.api is not None
        os.killpg(self.api.pid, signal.SIGKILL)
        self.api.wait()

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        proc = self._spawn(["worker"], f"worker-{n}.log", {**self.env, "IPO_WORKER_ID": f"worker-{n}", **env})
        self.workers.append(proc)
        return proc

    def worker_log(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.logs / f"worker-{self.workers.index(proc)}.log").read_text(errors="replace")

    def trainer_pid(self, worker: subprocess.Popen[bytes], module: str = "worker.training.run") -> int | None:
        for p in process_tree(worker.pid)[1:]:
            with contextlib.suppress(psutil.Error):
                if module in " ".join(p.cmdline()):
                    return p.pid
        return None

    def close(self) -> None:
        procs = [*self.workers, *([self.api] if self.api else [])]
        victims = [p for proc in procs for p in process_tree(proc.pid)]
        for p in victims:
            with contextlib.suppress(psutil.Error):
                p.kill()
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.wait(10)
        self.http.close()
        self.engine.dispose()

    # ---- API ----

    def train_file(self) -> str:
        if self._train_file is None:
            train, _ = write_demo_data(self.root / "data", n_train=64, n_valid=16, seed=1)
            with train.open("rb") as fh:
                r = self.http.post("/v1/files", files={"file": (train.name, fh)}, data={"purpose": "fine-tune"})
            assert r.status_code == 200 and r.json()["status"] == "processed", r.text
            self._train_file = r.json()["id"]
        return self._train_file

    def job_body(self, *, max_steps: int = 20, checkpoint_every: int = 4, batch_size: int = 8) -> dict[str, Any]:
        return {
            "model": "tiny-mistral",
            "training_file": self.train_file(),
            "seed": 7,
            "method": {
                "type": "ipo",
                "ipo": {
                    "hyperparameters": {
                        "max_steps": max_steps,
                        "batch_size": batch_size,
                        "beta": 0.1,
                        "checkpoint_every": checkpoint_every,
                    }
                },
            },
        }

    def submit(self, **kw: Any) -> str:
        r = self.http.post("/v1/fine_tuning/jobs", json=self.job_body(**kw))
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    def api_job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/fine_tuning/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    # ---- the ledger, read directly ----

    def db(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def job(self, job_id: str) -> Job:
        with self.db() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return job

    def events(self, job_id: str) -> list[JobEvent]:
        with self.db() as s:
            return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        with self.db() as s:
            return list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))

    def outbox(self, job_id: str) -> list[OutboxMessage]:
        with self.db() as s:
            rows = s.scalars(select(OutboxMessage).order_by(OutboxMessage.id))
            return [r for r in rows if r.payload.get("job_id") == job_id]

    def wait_status(self, job_id: str, *statuses: str, timeout: float = 240) -> Job:
        return wait_for(
            f"{job_id} to be {statuses}",
            lambda: (j := self.job(job_id)).status in statuses and j,
            timeout,
            interval=0.5,
        )

    def wait_step(self, job_id: str, step: int, *, checkpoint: int | None = None, timeout: float = 180) -> Job:
        """Until the job reached ``step`` (and, if given, has a recorded checkpoint at >= ``checkpoint``)."""

        def reached() -> Job | None:
            job = self.job(job_id)
            assert job.status not in ("failed", "succeeded", "cancelled"), (job.status, job.error)
            if (job.step or 0) < step:
                return None
            if checkpoint is not None and not any(c.step >= checkpoint for c in self.checkpoints(job_id)):
                return None
            return job

        return wait_for(f"{job_id} to reach step {step}", reached, timeout, interval=0.2)

    def steps_by_attempt(self, job_id: str) -> dict[int, list[int]]:
        """Training-metrics steps reported per attempt, in event-id order."""
        out: dict[int, list[int]] = {}
        for e in self.events(job_id):
            if e.type == "metrics" and e.data and "train_loss" in e.data and e.attempt is not None:
                out.setdefault(e.attempt, []).append(int(e.data["step"]))
        return out

    def seqs_by_attempt(self, job_id: str) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for e in self.events(job_id):
            if e.attempt is not None and e.seq is not None:
                out.setdefault(e.attempt, []).append(e.seq)
        return out

    def diagnostics(self, job_id: str | None = None) -> str:
        parts = []
        if job_id:
            parts += [f"{e.id} a={e.attempt} s={e.seq} {e.message}" for e in self.events(job_id)[-40:]]
        for name in sorted(os.listdir(self.logs)):
            parts.append(f"--- {name} ---\n" + (self.logs / name).read_text(errors="replace")[-3000:])
        return "\n".join(parts)


def make_stack(pg: ThrowawayPostgres, redis: ThrowawayRedis, root: Path, models: Path, **env: str) -> Stack:
    name = f"ipo_rel_{secrets.token_hex(4)}"
    db_url = pg.create_database(name)
    upgrade(db_url)
    engine = create_engine(db_url, poolclass=NullPool)
    with Session(engine) as session, session.begin():
        _, key = create_key(session, name)
    engine.dispose()
    port = free_port()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    full_env = {
        **os.environ,
        "IPO_DATABASE_URL": db_url,
        "IPO_BROKER_URL": redis.url,
        "IPO_QUEUE": f"ipo.jobs.{name}",
        "IPO_VAR_DIR": str(root / "var"),
        "IPO_MODELS_DIR": str(models),
        "IPO_WORKER_TOKEN": "reliability-worker-token",
        "IPO_API_URL": f"http://127.0.0.1:{port}",
        "IPO_DEVICE": "cpu",
        "IPO_RUN_WEBHOOK_SENDER": "false",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        **FAST_PROTOCOL,
        **env,
    }
    return Stack(
        pg=pg, redis=redis, db_url=db_url, env=full_env, root=root, port=port, api_key=key, queue=full_env["IPO_QUEUE"]
    )


@pytest.fixture
def stack(
    pg: ThrowawayPostgres, redis_server: ThrowawayRedis, tiny_models_dir: Path, tmp_path: Path
) -> Iterator[Stack]:
    """The API running (dispatcher on); tests start their own workers."""
    s = make_stack(pg, redis_server, tmp_path, tiny_models_dir)
    try:
        s.start_api()
        yield s
    finally:
        s.close()
