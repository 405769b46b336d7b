"""API throughput with 1 vs 2 replicas (``ipo serve`` processes) on one Postgres and one Redis.

    BENCH_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres BENCH_REDIS_URL=redis://127.0.0.1:6379/0 \
        python -m bench.replicas_bench [--seconds 15] [--connections 50] [--rounds 2]

Needs Postgres (replicas share the ledger and its leader lock) and Redis (the shared rate limit), and
``wrk`` on PATH (the load generator: C, one thread per target, so the client costs little CPU). Both
replicas run from the start, on one fresh database; each replica is one uvicorn process with the
dispatcher on (one of them leads) and the rate limit on at a limit never reached, so every request pays
the shared Redis token bucket as in production. Per endpoint (retrieve ``GET /v1/fine_tuning/jobs/{id}``,
list ``GET /v1/fine_tuning/jobs?limit=20``, create ``POST /v1/fine_tuning/jobs``) and round, in this
order: ``1 replica`` (one wrk, all connections on replica A), ``2 replicas`` (two wrk at once, half the
connections each on A and on B: clients spread over replicas, no balancer in the path), and, when
``haproxy`` is installed, ``2 replicas via HAProxy`` (one wrk on the balancer with
deploy/haproxy/haproxy.cfg). Reports requests/s (2xx only), p50/p99 latency and the ratio to 1 replica
measured in the same round; the row keeps the median of the rounds.

``--dispatcher-process`` runs the production shape of docker-compose.yml instead: the replicas with
``IPO_RUN_DISPATCHER=false`` and the singleton loops in an ``ipo dispatcher`` process of their own (so no
replica pays for sending the doorbells of the creates).

On a machine with C cores shared with other work, N replicas can only help while cores are idle: the
figure is what it is, recorded with the load average.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench._common import (
    ROOT,
    free_port,
    fresh_database,
    loadavg,
    models_dir_with,
    record,
    redis_url,
    start_process,
    stop_process,
    tiny_model_dir,
    wait_for_quiet,
    wait_http,
)
from bench.train_throughput import method_block

ENDPOINTS = ("retrieve", "list", "create")
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


@dataclass
class Wrk:
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    errors: int


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def parse_wrk(out: str) -> Wrk:
    """Figures from ``wrk --latency`` output: 2xx requests/s, p50/p99 (ms), non-2xx and socket errors."""
    total = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))  # type: ignore[union-attr]
    seconds = float(re.search(r"requests in ([\d.]+)s", out).group(1))  # type: ignore[union-attr]
    non_2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    return Wrk((total - non_2xx) / seconds, p50, p99, non_2xx, errors)


def wrk_script(tmp: Path, endpoint: str, api_key: str, job_id: str, file_id: str) -> Path:
    """A wrk Lua script for ``endpoint``: method, path, headers and body."""
    import json

    path = {"retrieve": f"/v1/fine_tuning/jobs/{job_id}", "list": "/v1/fine_tuning/jobs?limit=20"}.get(
        endpoint, "/v1/fine_tuning/jobs"
    )
    lines = [f'wrk.headers["Authorization"] = "Bearer {api_key}"']
    if endpoint == "create":
        body = json.dumps({"model": "tiny-mistral", "training_file": file_id, "method": method_block(10)})
        lines += ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"', f"wrk.body = [[{body}]]"]
    lines.append(f'wrk.path = "{path}"')
    script = tmp / f"{endpoint}.lua"
    script.write_text("\n".join(lines) + "\n")
    return script


def outbox_backlog(database_url: str, limit_seconds: float = 300.0) -> str:
    """Whether the leader's dispatcher kept up with the creates: the doorbells still unsent when the last
    create round ends, and how long the leader then takes to send them all (None: not within the limit)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    count = text("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
    try:
        with engine.connect() as conn:
            total = conn.scalar(text("SELECT count(*) FROM outbox"))
            pending = conn.scalar(count)
        started = time.monotonic()
        left = pending
        while left and time.monotonic() - started < limit_seconds:
            time.sleep(0.5)
            with engine.connect() as conn:
                left = conn.scalar(count)
        drained = (
            f"sent within {time.monotonic() - started:.1f} s"
            if not left
            else f"{left} still unsent after {limit_seconds:.0f} s"
        )
        return f"{pending} of {total} unsent, {drained}"
    finally:
        engine.dispose()


def run_wrk(targets: list[str], script: Path, connections: int, seconds: int) -> Wrk:
    """One wrk per target at once, ``connections`` split evenly; figures summed (rps) or worst (p99)."""
    per = max(1, connections // len(targets))
    procs = [
        subprocess.Popen(
            ["wrk", "-t1", f"-c{per}", f"-d{seconds}s", "--latency", "--timeout", "10s", "-s", str(script), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for url in targets
    ]
    results = [parse_wrk(p.communicate(timeout=seconds + 60)[0]) for p in procs]
    return Wrk(
        rps=sum(r.rps for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=max(r.p99_ms for r in results),
        non_2xx=sum(r.non_2xx for r in results),
        errors=sum(r.errors for r in results),
    )


@contextmanager
def service(tmp: Path, dispatcher_process: bool = False) -> Iterator[tuple[list[str], str | None, str, str, str, str]]:
    """Two replicas (and HAProxy when installed) on one fresh database, and with ``dispatcher_process`` an
    ``ipo dispatcher`` running the loops instead of them. Yields (replica URLs, balancer URL or None, API
    key, a job id, a file id, the database URL)."""
    from app.auth import create_key
    from app.db import make_engine, make_sessionmaker
    from app.migrate import upgrade

    rurl = redis_url()
    if not os.environ.get("BENCH_DATABASE_URL") or not rurl:
        sys.exit("replicas_bench needs BENCH_DATABASE_URL (Postgres) and BENCH_REDIS_URL (Redis)")
    with fresh_database(tmp, "replicas") as database_url:
        upgrade(database_url)
        engine = make_engine(database_url)
        with make_sessionmaker(engine)() as session, session.begin():
            _, key = create_key(session, "bench-replicas")
        engine.dispose()
        env = {
            **os.environ,
            "IPO_DATABASE_URL": database_url,
            "IPO_BROKER_URL": rurl,
            "IPO_QUEUE": f"ipo.jobs.bench-replicas-{os.getpid()}",
            "IPO_STORAGE_URL": f"file://{tmp / 'storage'}",
            "IPO_MODELS_DIR": str(models_dir_with(tiny_model_dir(), tmp)),
            "IPO_WORKER_TOKEN": "bench-replicas-token",
            "IPO_RATE_LIMIT_PER_MINUTE": "1000000000",  # on (a Redis round trip per request), never reached
            "IPO_MAX_ACTIVE_JOBS": "0",
            "IPO_RUN_WEBHOOK_SENDER": "false",
            "IPO_LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        procs: list[subprocess.Popen[bytes]] = []
        urls = []
        try:
            if dispatcher_process:
                env["IPO_RUN_DISPATCHER"] = "false"
                log = tmp / "dispatcher.log"
                procs.append(
                    start_process(
                        [sys.executable, "-m", "ipo_cli.main", "dispatcher"],
                        {**env, "IPO_VAR_DIR": str(tmp / "var-dispatcher")},
                        log,
                    )
                )
            for name in ("a", "b"):
                port = free_port()
                log = tmp / f"api-{name}.log"
                proc = start_process(
                    [sys.executable, "-m", "ipo_cli.main", "serve", "--port", str(port)],
                    {**env, "IPO_VAR_DIR": str(tmp / f"var-{name}")},
                    log,
                )
                procs.append(proc)
                urls.append(f"http://127.0.0.1:{port}")
                wait_http(f"{urls[-1]}/readyz", [proc], log)
            lb_url = None
            if shutil.which("haproxy"):
                lb_port = free_port()
                lb_env = {
                    **os.environ,
                    "IPO_LB_PORT": str(lb_port),
                    "IPO_LB_API_1": urls[0].removeprefix("http://"),
                    "IPO_LB_API_2": urls[1].removeprefix("http://"),
                }
                lb = start_process(["haproxy", "-f", str(HAPROXY_CFG)], lb_env, tmp / "haproxy.log")
                procs.append(lb)
                lb_url = f"http://127.0.0.1:{lb_port}"
                wait_http(f"{lb_url}/lb-healthz", [lb], tmp / "haproxy.log")
            headers = {"Authorization": f"Bearer {key}"}
            from worker.training.demo_data import write_demo_data

            data = write_demo_data(tmp / "data")[0].read_bytes()
            r = httpx.post(
                f"{urls[0]}/v1/files",
                headers=headers,
                data={"purpose": "fine-tune"},
                files={"file": ("train.jsonl", data)},
                timeout=60,
            )
            r.raise_for_status()
            file_id = r.json()["id"]
            body = {"model": "tiny-mistral", "training_file": file_id, "method": method_block(10)}
            job_ids = []
            for _ in range(25):  # a list page of 20 and some to spare
                j = httpx.post(f"{urls[1]}/v1/fine_tuning/jobs", headers=headers, json=body, timeout=60)
                j.raise_for_status()
                job_ids.append(j.json()["id"])
            yield urls, lb_url, key, job_ids[0], file_id, database_url
        finally:
            for p in reversed(procs):
                stop_process(p, 30)
            import redis

            with redis.Redis.from_url(rurl) as r:  # the doorbells of the created jobs: no worker reads them
                r.delete(env["IPO_QUEUE"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=15, help="wrk duration per measurement")
    p.add_argument("--connections", type=int, default=50, help="concurrent connections in total")
    p.add_argument("--rounds", type=int, default=2, help="rounds (1 replica, 2 replicas[, via HAProxy]) per endpoint")
    p.add_argument(
        "--dispatcher-process",
        action="store_true",
        help="replicas with IPO_RUN_DISPATCHER=false and the loops in an `ipo dispatcher` process",
    )
    a = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    wait_for_quiet()
    loads = [loadavg()]
    results: dict[str, dict[str, list[Wrk]]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="ipo-bench-replicas-") as tmp_name,
        service(Path(tmp_name), a.dispatcher_process) as st,
    ):
        urls, lb_url, key, job_id, file_id, database_url = st
        configs = {"1 replica": [urls[0]], "2 replicas": urls}
        if lb_url:
            configs["2 replicas via HAProxy"] = [lb_url]
        for endpoint in ENDPOINTS:
            script = wrk_script(Path(tmp_name), endpoint, key, job_id, file_id)
            results[endpoint] = {name: [] for name in configs}
            for round_no in range(a.rounds):
                for name, targets in configs.items():
                    run_wrk(targets, script, a.connections, 2)  # warm-up, not measured
                    w = run_wrk(targets, script, a.connections, a.seconds)
                    results[endpoint][name].append(w)
                    print(
                        f"{endpoint:8s} round {round_no + 1} {name:24s} {w.rps:7.1f} req/s  p50 {w.p50_ms:6.1f} ms"
                        f"  p99 {w.p99_ms:7.1f} ms  non-2xx {w.non_2xx}  socket errors {w.errors}  load {loadavg()}",
                        flush=True,
                    )
                    time.sleep(1)
            loads.append(loadavg())
        backlog = outbox_backlog(database_url)
    cells = {
        "db": "postgres + redis" + ("; loops in `ipo dispatcher`" if a.dispatcher_process else ""),
        "load during runs": " / ".join(loads),
        "connections x seconds": f"{a.connections} x {a.seconds} s, {a.rounds} rounds (median)",
    }
    for endpoint, by_config in results.items():
        base = statistics.median(w.rps for w in by_config["1 replica"])
        parts = []
        for name, runs in by_config.items():
            rps = statistics.median(w.rps for w in runs)
            p50 = statistics.median(w.p50_ms for w in runs)
            p99 = statistics.median(w.p99_ms for w in runs)
            bad = sum(w.non_2xx + w.errors for w in runs)
            ratio = "" if name == "1 replica" else f", **{rps / base:.2f}x**"
            parts.append(
                f"{name}: {rps:.0f} rps (rounds {', '.join(f'{w.rps:.0f}' for w in runs)}), "
                f"p50 {p50:.1f} / p99 {p99:.1f} ms" + (f", {bad} non-2xx/errors" if bad else "") + ratio
            )
        cells[endpoint] = "; ".join(parts)
    cells["create"] += f"; leader's outbox after the creates: {backlog}"
    key = f"replicas {a.seconds} {a.connections} {a.rounds}" + (" dispatcher-process" if a.dispatcher_process else "")
    record("replicas_bench", key, cells)


if __name__ == "__main__":
    main()
