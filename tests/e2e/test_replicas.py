"""Several API replicas act as one service: real ``ipo serve`` processes on one Postgres, one Redis and one
S3 bucket (moto's server), with a real Celery worker training the tiny model.

Two replicas, clients alternating between them: the same ``Idempotency-Key`` sent to both makes one job,
an SSE stream on replica A sees the events the worker reports through replica B, and when A (the leader)
is killed with SIGKILL the stream resumes on B with ``Last-Event-ID`` (every event exactly once), B takes
over the dispatcher, a restarted replica joins as a follower, and no job is lost or run twice. The per-key
rate limit holds across replicas. ``ipo serve --workers 2`` is checked the same way: one leader among its
processes (taken over when that process is killed), ``/metrics`` summed over both, one rate limit.

Leadership is read from Postgres itself: the backend holding the advisory lock (``pg_locks``), mapped by
its client port to the process that owns that connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from app.auth import create_key
from app.migrate import upgrade
from app.models import Job, JobEvent
from app.services.leader import LEADER_LOCK_ID
from ipo_cli.processes import free_port
from tests.conftest import fresh_database
from worker.training.demo_data import write_demo_data

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3000)]  # real training on a shared CPU

REPO = Path(__file__).resolve().parents[2]
RATE_PER_MINUTE = 120
"""The per-key limit the replicas run with: above what the scenario's own clients send in a minute."""
LEADER_LINE = "is now the leader"
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | Literal[False] | None], timeout: float = 120) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except OperationalError:  # the shared database server is busy (e.g. out of connections): ask again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> set[int]:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.proc.pid)
            return {root.pid, *(c.pid for c in root.children(recursive=True))}
        return set()

    def server_processes(self) -> list[psutil.Process]:
        """The processes serving requests: uvicorn's spawned workers, or the one process itself."""
        root = psutil.Process(self.proc.pid)
        spawned = [c for c in root.children() if "spawn_main" in " ".join(c.cmdline())]
        return spawned or [root]

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown hook runs, no lock is released politely."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


@dataclass
class Service:
    """The shared parts (database, Redis, bucket, API keys) and the processes started on them."""

    database_url: str
    env: dict[str, str]
    root: Path
    api_key: str
    burst_keys: list[str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.engine = create_engine(self.database_url, poolclass=NullPool)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def _spawn(self, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ipo_cli.main", *args],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start_replica(self, name: str, workers: int = 1) -> Replica:
        port = free_port()
        log = self.root / f"api-{name}.log"
        env = {**self.env, "IPO_VAR_DIR": str(self.root / f"var-{name}"), "IPO_API_URL": f"http://127.0.0.1:{port}"}
        proc = self._spawn(["serve", "--port", str(port), "--workers", str(workers)], log, env)
        replica = Replica(name, port, proc, log)

        def ready() -> bool:
            assert proc.poll() is None, f"replica {name} exited:\n{replica.text()[-3000:]}"
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{replica.url}/readyz", timeout=2).status_code == 200
            return False

        wait_for(f"replica {name} to be ready", ready)
        return replica

    def start_worker(self, api_url: str) -> subprocess.Popen[bytes]:
        env = {**self.env, "IPO_API_URL": api_url, "IPO_WORKER_ID": "worker-0", "IPO_VAR_DIR": str(self.root / "var-w")}
        return self._spawn(["worker"], self.root / "worker.log", env)

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.engine.dispose()

    # ---- what Postgres says ----

    def leader_pids(self) -> list[int]:
        """Pids of the processes whose connection holds this database's leader lock (normally one)."""
        query = text(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND ((l.classid::bigint << 32) | l.objid::bigint) = :key"
        )
        with self.engine.connect() as conn:
            ports = {int(p) for p in conn.execute(query, {"key": LEADER_LOCK_ID}).scalars() if p is not None}
        pg_port = make_url(self.database_url).port or 5432
        owners = {
            c.pid
            for c in psutil.net_connections("tcp")
            if c.pid and c.laddr and c.laddr.port in ports and c.raddr and c.raddr.port == pg_port
        }
        return sorted(owners)

    def leader(self, replicas: list[Replica]) -> Replica | None:
        pids = self.leader_pids()
        holders = [r for r in replicas if r.pids() & set(pids)]
        assert len(pids) <= 1 and len(holders) <= 1, f"more than one leader: {pids}"
        return holders[0] if holders else None

    def job(self, job_id: str) -> Job:
        with Session(self.engine) as s:
            job = s.get(Job, job_id)
            assert job is not None
            return job

    def wait_ended(self, job_id: str, timeout: float = 1500) -> Job:
        def ended() -> Job | None:
            job = self.job(job_id)
            return job if job.status in ("succeeded", "failed", "cancelled") else None

        return wait_for(f"{job_id} to end", ended, timeout)

    def events(self, job_id: str) -> list[JobEvent]:
        with Session(self.engine) as s:
            return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))

    def job_count(self) -> int:
        with Session(self.engine) as s:
            return int(s.scalar(select(func.count()).select_from(Job)) or 0)

    def diagnostics(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n" + p.read_text(errors="replace")[-4000:] for p in sorted(self.root.glob("*.log"))
        )


@pytest.fixture
def service(
    s3_env: Callable[[], str], redis_url: str | None, queue_name: str, tiny_models_dir: Path, tmp_path: Path
) -> Iterator[Service]:
    if not os.environ.get("TEST_DATABASE_URL") or not redis_url:
        pytest.skip(
            "replicas share a Postgres (leader lock) and a Redis (rate limit): set TEST_DATABASE_URL and TEST_REDIS_URL"
        )
    bucket = s3_env()  # os.environ now points the AWS SDK at the test's S3 server
    with fresh_database(tmp_path, "ipo_replicas") as database_url:
        upgrade(database_url)
        engine = create_engine(database_url, poolclass=NullPool)
        with Session(engine) as session, session.begin():
            _, key = create_key(session, "replicas")
            burst = [create_key(session, f"burst-{i}")[1] for i in range(2)]
        engine.dispose()
        env = {
            **os.environ,
            "IPO_DATABASE_URL": database_url,
            "IPO_BROKER_URL": redis_url,
            "IPO_QUEUE": f"{queue_name}.replicas-{secrets.token_hex(3)}",
            "IPO_STORAGE_URL": bucket,
            "IPO_MODELS_DIR": str(tiny_models_dir),
            "IPO_WORKER_TOKEN": "replicas-worker-token",
            "IPO_RATE_LIMIT_PER_MINUTE": str(RATE_PER_MINUTE),
            "IPO_HEARTBEAT_SECONDS": "2",
            "IPO_DISPATCH_INTERVAL_SECONDS": "0.5",
            # Queued jobs get their doorbell again every 5 s: duplicate deliveries that must not run twice.
            "IPO_REDISPATCH_AFTER_SECONDS": "5",
            "IPO_RUN_WEBHOOK_SENDER": "false",
            "IPO_DEVICE": "cpu",
            "IPO_LOG_FORMAT": "text",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        svc = Service(database_url, env, tmp_path, key, burst)
        try:
            yield svc
        finally:
            svc.close()


class SseReader(threading.Thread):
    """Reads a job's SSE stream in the background: each event's id (in arrival order), and whether the
    stream ended with ``done`` or broke (the replica died)."""

    def __init__(self, base_url: str, job_id: str, headers: dict[str, str], last_event_id: int | None = None):
        super().__init__(daemon=True)
        self.url = f"{base_url}/v1/fine_tuning/jobs/{job_id}/events"
        self.headers = {**headers, "Accept": "text/event-stream"}
        if last_event_id is not None:
            self.headers["Last-Event-ID"] = f"ftevent-{last_event_id}"
        self.ids: list[int] = []
        self.types: list[str] = []
        self.done = False
        self.broken: str | None = None
        self.status: int | None = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, headers=self.headers, timeout=httpx.Timeout(10, read=90)) as r:
                self.status = r.status_code
                event_id: int | None = None
                for line in r.iter_lines():
                    if line.startswith("id: "):
                        event_id = int(line.removeprefix("id: ftevent-"))
                    elif line == "event: done":
                        self.done = True
                    elif line.startswith("data: ") and event_id is not None:
                        self.types.append(json.loads(line.removeprefix("data: "))["type"])
                        self.ids.append(event_id)
                        event_id = None
        except httpx.TransportError as exc:
            self.broken = type(exc).__name__


def job_body(file_id: str, max_steps: int) -> dict[str, Any]:
    hyper = {"max_steps": max_steps, "batch_size": 8, "beta": 0.1, "checkpoint_every": min(10, max_steps)}
    return {
        "model": "tiny-mistral",
        "training_file": file_id,
        "seed": 7,
        "method": {"type": "ipo", "ipo": {"hyperparameters": hyper}},
    }


def create(client: httpx.Client, body: dict[str, Any], key: str) -> httpx.Response:
    return client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": key})


def burst(urls: list[str], api_key: str, refusals_each: int = 10) -> tuple[dict[str, int], dict[str, int], float]:
    """GET /v1/models round-robin over ``urls`` with one key until each replica refused ``refusals_each``
    times. Returns (200s per url, 429s per url, seconds taken)."""
    ok = dict.fromkeys(urls, 0)
    refused = dict.fromkeys(urls, 0)
    clients = {u: httpx.Client(base_url=u, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) for u in urls}
    started = time.monotonic()
    try:
        for i in range(2000):
            if min(refused.values()) >= refusals_each:
                break
            url = urls[i % len(urls)]
            r = clients[url].get("/v1/models")
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "rate_limit_exceeded", r.text
                assert int(r.headers["Retry-After"]) >= 1
                refused[url] += 1
            else:
                assert r.status_code == 200, r.text
                ok[url] += 1
    finally:
        for c in clients.values():
            c.close()
    return ok, refused, time.monotonic() - started


def assert_one_shared_limit(ok: dict[str, int], refused: dict[str, int], seconds: float) -> None:
    # One bucket of RATE_PER_MINUTE tokens, refilled at RATE_PER_MINUTE/60 a second, for the whole service.
    # Per-process buckets would have let each replica pass RATE_PER_MINUTE on its own.
    allowed = RATE_PER_MINUTE + seconds * RATE_PER_MINUTE / 60 + 1
    assert RATE_PER_MINUTE <= sum(ok.values()) <= allowed, (ok, refused, seconds)
    assert all(ok.values()) and all(refused.values()), (ok, refused)


def test_two_replicas_act_as_one_service(service: Service) -> None:
    svc = service
    a = svc.start_replica("a")
    assert wait_for("replica a to lead", lambda: svc.leader([a]), 60) is a
    b = svc.start_replica("b")
    assert svc.leader([a, b]) is a
    svc.start_worker(b.url)  # the worker reports through b only: a sees its events through the database
    ha = httpx.Client(base_url=a.url, headers=svc.headers, timeout=60)
    hb = httpx.Client(base_url=b.url, headers=svc.headers, timeout=60)

    # One store: a file uploaded through a is read back through b.
    train, _ = write_demo_data(svc.root / "data", n_train=24, n_valid=8, seed=1)  # small: the CPU is shared
    with train.open("rb") as fh:
        r = ha.post("/v1/files", files={"file": (train.name, fh)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200 and r.json()["status"] == "processed", r.text
    file_id = r.json()["id"]
    assert hb.get(f"/v1/files/{file_id}/content").content == train.read_bytes()

    # The same Idempotency-Key on both replicas, one after the other: one job.
    long_body = job_body(file_id, max_steps=30)
    first, again = create(ha, long_body, "job-1"), create(hb, long_body, "job-1")
    assert first.status_code == 200 and again.status_code == 200, (first.text, again.text)
    job1 = first.json()["id"]
    assert again.json()["id"] == job1
    stream_a = SseReader(a.url, job1, svc.headers)
    stream_a.start()

    # ... and at the same moment: one runs, the other is told it is in flight (409) or replays it.
    body2 = job_body(file_id, max_steps=4)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda c: create(c, body2, "job-2"), [ha, hb]))
    assert {r.status_code for r in answers} <= {200, 409} and 200 in {r.status_code for r in answers}
    job2 = next(r.json()["id"] for r in answers if r.status_code == 200)
    for client, r in zip([ha, hb], answers, strict=True):
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "idempotency_key_in_use"
            assert create(client, body2, "job-2").json()["id"] == job2  # the retry replays it
    assert svc.job_count() == 2

    for client in (ha, hb, ha):
        listed = client.get("/v1/fine_tuning/jobs").json()
        assert {j["id"] for j in listed["data"]} == {job1, job2}
        assert client.get(f"/v1/fine_tuning/jobs/{job2}").json()["training_file"] == file_id

    # a streams what the worker reports through b; kill a (the leader) while job 1 trains.
    wait_for("a metrics event on replica a's stream", lambda: "metrics" in stream_a.types, 300)
    running = svc.job(job1)
    assert running.status == "running" and (running.step or 0) < 30, "job 1 ended before the kill"
    assert svc.leader([a, b]) is a
    killed_at = time.monotonic()
    a.kill()
    stream_a.join(30)
    assert not stream_a.is_alive() and stream_a.broken and not stream_a.done, stream_a.broken
    last_seen = max(stream_a.ids)

    # b takes the lock (and the dispatcher) over within seconds.
    assert wait_for("replica b to lead", lambda: svc.leader([b]), 60) is b
    takeover_seconds = time.monotonic() - killed_at
    assert LEADER_LINE in b.text()

    # The stream resumes on b from the last id a sent.
    stream_b = SseReader(b.url, job1, svc.headers, last_event_id=last_seen)
    stream_b.start()

    # A job created after the kill is dispatched by the new leader; a restarted replica joins as a follower.
    job3 = create(hb, job_body(file_id, max_steps=4), "job-3").json()["id"]
    a2 = svc.start_replica("a2")
    h2 = httpx.Client(base_url=a2.url, headers=svc.headers, timeout=60)
    job4 = create(h2, job_body(file_id, max_steps=4), "job-4").json()["id"]
    assert create(h2, long_body, "job-1").json()["id"] == job1  # replayed by another process than made it
    assert svc.leader([a2, b]) is b

    jobs = [job1, job2, job3, job4]
    for job_id in jobs:
        job = svc.wait_ended(job_id)
        assert job.status == "succeeded", (job.error, svc.diagnostics())
    stream_b.join(120)
    assert stream_b.status == 200 and stream_b.done and not stream_b.broken, (stream_b.status, stream_b.broken)

    # No event lost on the stream, none twice: a's part then b's part is every event of job 1.
    streamed = stream_a.ids + stream_b.ids
    stored = [e.id for e in svc.events(job1)]
    assert len(streamed) == len(set(streamed)), "an event was streamed twice"
    assert sorted(streamed) == stored
    assert stream_b.ids and min(stream_b.ids) > last_seen

    # No job lost, none duplicated, none run twice.
    assert svc.job_count() == 4
    for client in (h2, hb):
        assert {j["id"] for j in client.get("/v1/fine_tuning/jobs").json()["data"]} == set(jobs)
    for job_id in jobs:
        job, events = svc.job(job_id), svc.events(job_id)
        assert job.attempt == 1 and job.failed_attempts == 0, (job_id, job.attempt)
        assert [e.message for e in events if e.message.startswith("Attempt ")] == [
            "Attempt 1 started on worker worker-0"
        ]
        assert {e.attempt for e in events if e.attempt is not None} == {1}
        steps = [int(e.data["step"]) for e in events if e.type == "metrics" and e.data and "train_loss" in e.data]
        assert steps and steps == sorted(set(steps)), steps  # each step reported once, by one run
        assert sum(e.message == "The job has successfully completed" for e in events) == 1

    assert LEADER_LINE not in a2.text()  # it never led while b was alive
    assert svc.leader([a2, b]) is b

    # The per-key rate limit is one bucket for the whole service.
    ok, refused, seconds = burst([a2.url, b.url], svc.burst_keys[0])
    assert_one_shared_limit(ok, refused, seconds)
    assert hb.get("/v1/models").status_code == 200  # another key's bucket is untouched

    print(
        f"\nreplicas: leader takeover after SIGKILL {takeover_seconds:.1f} s; "
        f"rate limit {ok} ok, {refused} refused in {seconds:.1f} s"
    )
    for c in (ha, hb, h2):
        c.close()


def _healthz_count(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith('ipo_http_request_duration_seconds_count{method="GET",route="/healthz",status="200"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _per_process_healthz(metrics_dir: Path, pid: int, scratch: Path) -> float:
    """/healthz requests one process counted, read from its own file in the multiprocess directory."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    only = scratch / f"metrics-of-{pid}"
    only.mkdir(exist_ok=True)
    for f in metrics_dir.glob(f"*_{pid}.db"):
        (only / f.name).write_bytes(f.read_bytes())
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(only))
    return _healthz_count(generate_latest(registry).decode())


def test_serve_with_several_workers_is_one_service(service: Service) -> None:
    svc = service
    server = svc.start_replica("w", workers=2)
    processes = wait_for("two uvicorn workers", lambda: len(p := server.server_processes()) == 2 and p, 60)
    pids = {p.pid for p in processes}

    # Exactly one of the two processes leads.
    leader_pid = wait_for("a leader among the workers", lambda: svc.leader_pids(), 60)
    assert len(leader_pid) == 1 and leader_pid[0] in pids, (leader_pid, pids)

    # /metrics sums both processes' counters, whichever of them answers the scrape.
    metrics_dir = Path(processes[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
    assert all(Path(p.environ()["PROMETHEUS_MULTIPROC_DIR"]) == metrics_dir for p in processes)
    sent = 0
    with ThreadPoolExecutor(8) as pool:
        while sent < 2000:
            codes = list(pool.map(lambda _: httpx.get(f"{server.url}/healthz", timeout=30).status_code, range(40)))
            assert codes == [200] * 40
            sent += 40
            if all(_per_process_healthz(metrics_dir, pid, svc.root) > 0 for pid in pids):
                break
    per_process = {pid: _per_process_healthz(metrics_dir, pid, svc.root) for pid in pids}
    assert all(per_process.values()) and sum(per_process.values()) == sent, per_process
    for _ in range(4):  # new connections: either process may answer
        assert _healthz_count(httpx.get(f"{server.url}/metrics", timeout=30).text) == sent

    # One rate limit for the key, not one per process.
    ok, refused, seconds = burst([server.url, server.url], svc.burst_keys[1])
    assert refused[server.url] >= 10
    assert RATE_PER_MINUTE <= sum(ok.values()) <= RATE_PER_MINUTE + seconds * RATE_PER_MINUTE / 60 + 1, (ok, seconds)

    # SIGKILL the leading process: uvicorn starts a new one and the lock passes on; still exactly one leader.
    os.kill(leader_pid[0], signal.SIGKILL)
    new_leader = wait_for(
        "another process to lead", lambda: (p := svc.leader_pids()) and p[0] != leader_pid[0] and p, 60
    )
    assert len(new_leader) == 1 and new_leader[0] in server.pids()
    assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="no haproxy binary (apt-get install haproxy)")
def test_the_deployed_balancer_routes_around_a_killed_replica(service: Service) -> None:
    """deploy/haproxy/haproxy.cfg in front of two replicas, as docker-compose.yml runs it: requests reach
    both, an event stream passes through unbuffered, and a SIGKILLed replica costs no client a failed GET."""
    svc = service
    a, b = svc.start_replica("a"), svc.start_replica("b")
    lb_port = free_port()
    lb_env = {
        **os.environ,
        "IPO_LB_PORT": str(lb_port),
        "IPO_LB_API_1": f"127.0.0.1:{a.port}",
        "IPO_LB_API_2": f"127.0.0.1:{b.port}",
    }
    with (svc.root / "haproxy.log").open("ab") as out:
        lb = subprocess.Popen(
            ["haproxy", "-f", str(REPO / "deploy" / "haproxy" / "haproxy.cfg")],
            env=lb_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    svc.procs.append(lb)
    url = f"http://127.0.0.1:{lb_port}"
    wait_for("the balancer", lambda: _answers(f"{url}/lb-healthz"), 60)
    http = httpx.Client(base_url=url, headers=svc.headers, timeout=30)

    def served(replica: Replica) -> int:  # access-log lines "GET /v1/models 200 3.1ms"
        return replica.text().count("GET /v1/models 200 ")

    before = {r.name: served(r) for r in (a, b)}
    for _ in range(20):
        with httpx.Client(base_url=url, headers=svc.headers, timeout=30) as fresh:  # a new connection each time
            assert fresh.get("/v1/models").status_code == 200
    assert all(served(r) > before[r.name] for r in (a, b)), "the balancer sent every request to one replica"

    # An event stream through the balancer: frames arrive as written (a cancelled job ends the stream).
    train, _ = write_demo_data(svc.root / "data", n_train=16, n_valid=4, seed=1)
    with train.open("rb") as fh:
        file_id = http.post("/v1/files", files={"file": (train.name, fh)}, data={"purpose": "fine-tune"}).json()["id"]
    job_id = http.post("/v1/fine_tuning/jobs", json=job_body(file_id, max_steps=4)).json()["id"]
    stream = SseReader(url, job_id, svc.headers)
    stream.start()
    wait_for("the stream's first event", lambda: stream.ids, 60)
    assert http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    stream.join(60)
    assert stream.done and sorted(stream.ids) == [e.id for e in svc.events(job_id)]

    # Kill a replica: every GET still answers (a refused connection is retried on the other replica).
    a.kill()
    codes = []
    for _ in range(40):
        with httpx.Client(base_url=url, headers=svc.headers, timeout=30) as fresh:
            codes.append(fresh.get("/v1/models").status_code)
    assert codes == [200] * 40, codes
    http.close()


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(url, timeout=2).status_code == 200
    return False
