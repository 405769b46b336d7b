"""The public job endpoints under load, ipo-align vs a lean FastAPI + SQLAlchemy Core app, driven by wrk.

    BENCH_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres \\
        python -m bench.api_bench [--duration 8] [--rounds 3] [--connections 50] [--py-spy bench/profiles/x.json]

Needs ``wrk`` (Debian: ``apt-get install wrk``) and Postgres. Starts ``ipo serve`` (uvicorn, one process)
on a fresh Postgres database with every request feature on: API-key auth, tenancy, the per-key rate limit
(in process, 10^9 per minute so it never refuses but always counts), request ids, the access log (JSON
lines to a file) and the HTTP metrics; ``IPO_DB_POOL_SIZE=40`` like the reference (``POOL_SIZE``);
``IPO_RUN_DISPATCHER=false`` so created jobs stay queued and the
broker is not part of the figures. bench/reference_api.py (one uvicorn process) serves the same database,
so both answer the same key, project, jobs and events.

The load generator is wrk (C, one thread, ``--connections`` keep-alive connections, loopback), so the
client does not share the servers' Python bottleneck. For each round, each endpoint is run on both
servers back to back, the order alternating between rounds (A/B, B/A, ...), so load from other processes
on a shared machine falls on both; creates run first (they make the jobs and events the reads use).
Endpoints: create (POST a job), retrieve (GET a random job), list (``?limit=20``, full pages), events
(a random job's ``/events?limit=20``). Requests/s counts only 2xx answers; the ratio is ipo/reference per
round pair, reported as the median and the range over rounds, with wrk's latency p50/p99 and the load
average (1 min) measured around each run. Each server's own CPU time per request (/proc, user + system)
is reported too, with its ratio ref/ipo: on a machine shared with other work requests/s follow whatever
else runs, the CPU a request costs the server does not.

``--py-spy PATH`` also records the ipo server with ``py-spy record`` (speedscope JSON, or an SVG
flamegraph when PATH ends in .svg) during one extra run of each read endpoint after the measured rounds
(``PATH-retrieve.json``, ``PATH-list.json``, ``PATH-events.json``).
Target: >= 0.8x the reference's requests/s for retrieve, list and events.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench._common import db_kind, free_port, record, stack, start_process, stop_process, wait_http

ENDPOINTS = ("create", "retrieve", "list", "events")
READS = ("retrieve", "list", "events")
APPS = ("ipo", "ref")
RATE_LIMIT_PER_MINUTE = 1_000_000_000
"""On, so every request pays for the limiter's bucket, and high enough that the bench is never refused."""

POOL_SIZE = 40
"""Database connections of each server (ipo: ``IPO_DB_POOL_SIZE``; no overflow either side): one per
thread-pool thread (anyio's default, 40). The reference's sync ``yield`` dependency stalled with 20 (every
thread waiting for a connection while the connections wait for a thread to commit and return them), and
on a saturated machine the server with more database backends gets more of the CPU, so both get the same."""

METHOD = {"type": "ipo", "ipo": {"hyperparameters": {"beta": 0.1, "max_steps": 10, "batch_size": 2}}}


@dataclass
class WrkRun:
    """One wrk run: requests/s counts 2xx answers only; latencies in ms over every answer."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    errors: int
    load1: float
    cpu_ms_per_request: float
    """The server process's own CPU time (user + system, /proc) per answer: what a request costs the
    Python side whatever else runs on the machine (the database's CPU is not in it)."""


@dataclass
class Series:
    runs: list[WrkRun] = field(default_factory=list)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> tuple[float, float, float, int, int, int]:
    """wrk ``--latency`` output -> (2xx requests/s, p50 ms, p99 ms, requests, non-2xx, socket errors)."""
    requests_m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not requests_m:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    requests = int(requests_m.group(1))
    seconds = _ms(requests_m.group(2) + requests_m.group(3)) / 1e3
    non_2xx_m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non_2xx = int(non_2xx_m.group(1)) if non_2xx_m else 0
    errors_m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = sum(int(g) for g in errors_m.groups()) if errors_m else 0
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (p50 and p99):
        raise RuntimeError(f"no latency distribution in wrk output:\n{out}")
    return (requests - non_2xx) / seconds, _ms(p50.group(1)), _ms(p99.group(1)), requests, non_2xx, errors


def lua_script(endpoint: str, ids: list[str], path: Path, create_body: dict[str, Any]) -> Path:
    """A wrk script for ``endpoint``: a random job per request for retrieve/events, a JSON POST for create."""
    if endpoint == "create":
        body = json.dumps(create_body)
        text = (
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body)}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            'request = function() return wrk.format(nil, "/v1/fine_tuning/jobs") end\n'
        )
    elif endpoint == "list":
        text = 'request = function() return wrk.format("GET", "/v1/fine_tuning/jobs?limit=20") end\n'
    else:
        suffix = "/events?limit=20" if endpoint == "events" else ""
        table = ", ".join(json.dumps(i) for i in ids)
        text = (
            f"local ids = {{{table}}}\n"
            "math.randomseed(os.time())\n"
            "request = function()\n"
            f'  return wrk.format("GET", "/v1/fine_tuning/jobs/" .. ids[math.random(#ids)] .. "{suffix}")\n'
            "end\n"
        )
    path.write_text(text)
    return path


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, key: str, script: Path, duration_s: int, connections: int, server_pid: int) -> WrkRun:
    cmd = [
        "wrk",
        "--latency",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout",
        "15s",
        "-H",
        f"Authorization: Bearer {key}",
        "-s",
        str(script),
        url,
    ]
    cpu0 = process_cpu_s(server_pid)
    done = subprocess.run(cmd, capture_output=True, text=True)
    cpu = process_cpu_s(server_pid) - cpu0
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    out = done.stdout
    rps, p50, p99, requests, non_2xx, errors = parse_wrk(out)
    return WrkRun(rps, p50, p99, requests, non_2xx, errors, os.getloadavg()[0], cpu * 1e3 / max(1, requests))


def job_ids(database_url: str, limit: int = 2000) -> list[str]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [
                r[0] for r in conn.execute(text("SELECT id FROM jobs ORDER BY created_at DESC LIMIT :n"), {"n": limit})
            ]
    finally:
        engine.dispose()


def py_spy_record(pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes]:
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = "flamegraph" if out.suffix == ".svg" else "speedscope"
    exe = Path(sys.executable).parent / "py-spy"
    cmd = [
        str(exe) if exe.exists() else "py-spy",
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        "250",
    ]
    cmd += ["--format", fmt, "--output", str(out), "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _fmt(s: Series) -> str:
    rps = [r.rps for r in s.runs]
    p50 = statistics.median(r.p50_ms for r in s.runs)
    p99 = statistics.median(r.p99_ms for r in s.runs)
    cpu = statistics.median(r.cpu_ms_per_request for r in s.runs)
    return (
        f"{statistics.median(rps):.0f} rps ({min(rps):.0f}-{max(rps):.0f}), p50 {p50:.0f} / p99 {p99:.0f} ms, "
        f"CPU {cpu:.2f} ms/req"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=8, help="seconds per wrk run (creates: half)")
    p.add_argument("--rounds", type=int, default=3, help="A/B pairs per endpoint (order alternates)")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--py-spy", type=Path, default=None, help="also profile the ipo server (speedscope .json / .svg)")
    a = p.parse_args()
    if db_kind() != "postgres":
        raise SystemExit(
            "api_bench needs Postgres: set BENCH_DATABASE_URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres)"
        )
    if shutil.which("wrk") is None:
        raise SystemExit("api_bench needs wrk on PATH (Debian: apt-get install wrk)")
    from worker.training.demo_data import write_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        data = write_demo_data(tmp)[0].read_bytes()
    api_env = {
        "IPO_RUN_DISPATCHER": "false",
        "IPO_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT_PER_MINUTE),
        "IPO_DB_POOL_SIZE": str(POOL_SIZE),
    }
    series: dict[tuple[str, str], Series] = {(app, ep): Series() for app in APPS for ep in ENDPOINTS}
    loads: list[float] = [os.getloadavg()[0]]
    with stack("api", api_env=api_env) as st, tempfile.TemporaryDirectory(prefix="ipo-bench-wrk-") as tmp_s:
        tmp = Path(tmp_s)
        r = httpx.post(
            f"{st.url}/v1/files",
            headers=st.headers,
            data={"purpose": "fine-tune"},
            files={"file": ("train.jsonl", data)},
            timeout=60,
        )
        r.raise_for_status()
        create_body = {"model": "tiny-mistral", "training_file": r.json()["id"], "method": METHOD}
        probe = httpx.post(f"{st.url}/v1/fine_tuning/jobs", headers=st.headers, json=create_body, timeout=60)
        probe.raise_for_status()
        port = free_port()
        pool = POOL_SIZE
        ref_log = tmp / "ref.log"
        ref = start_process(
            [
                *(sys.executable, "bench/reference_api.py", "--port", str(port), "--database-url", st.database_url),
                *("--pool-size", str(pool), "--max-overflow", "0"),
            ],
            dict(os.environ),
            ref_log,
        )
        try:
            urls = {"ipo": st.url, "ref": f"http://127.0.0.1:{port}"}
            pids = {"ipo": st.api.pid, "ref": ref.pid}  # uvicorn serves in the process itself (one worker)
            wait_http(f"{urls['ref']}/healthz", [ref], ref_log)
            print(f"ipo-align at {urls['ipo']}, reference at {urls['ref']} (one database: {db_kind()})", flush=True)

            def measure(endpoint: str, order: tuple[str, ...], ids: list[str], duration: int) -> None:
                script = lua_script(endpoint, ids, tmp / f"{endpoint}.lua", create_body)
                for app in order:
                    run = run_wrk(urls[app], st.api_key, script, duration, a.connections, pids[app])
                    series[(app, endpoint)].runs.append(run)
                    loads.append(run.load1)
                    print(
                        f"  {endpoint:8s} {app}: {run.rps:7.0f} ok req/s  p50 {run.p50_ms:6.1f} ms  "
                        f"p99 {run.p99_ms:6.1f} ms  cpu {run.cpu_ms_per_request:.2f} ms/req  "
                        f"non-2xx {run.non_2xx}  socket errors {run.errors}  "
                        f"load {run.load1:.2f}",
                        flush=True,
                    )

            # creates first: they make the rows the reads use (both servers write the same project)
            for rnd in range(a.rounds):
                measure("create", APPS if rnd % 2 == 0 else APPS[::-1], [], max(2, a.duration // 2))
            ids = job_ids(st.database_url)
            for ep in READS:  # warm both servers' pools and caches, unmeasured
                script = lua_script(ep, ids, tmp / f"{ep}.lua", create_body)
                for app in APPS:
                    run_wrk(urls[app], st.api_key, script, 2, a.connections, pids[app])
            for rnd in range(a.rounds):
                for ep in READS:
                    measure(ep, APPS if rnd % 2 == 0 else APPS[::-1], ids, a.duration)
            if a.py_spy is not None:  # one profile per read endpoint: PATH-retrieve.json, ...
                secs = max(3, int(a.duration))
                for ep in READS:
                    out = a.py_spy.with_name(f"{a.py_spy.stem}-{ep}{a.py_spy.suffix}")
                    spy = py_spy_record(st.api.pid, out, secs)
                    time.sleep(0.5)
                    run_wrk(urls["ipo"], st.api_key, tmp / f"{ep}.lua", secs, a.connections, pids["ipo"])
                    _, err = spy.communicate(timeout=60)
                    print(f"py-spy: {out} ({spy.returncode}) {err.decode(errors='replace')[-300:]}", flush=True)
        finally:
            stop_process(ref)

    creates_s = max(2, a.duration // 2)
    cells: dict[str, str] = {
        "db": db_kind(),
        "load": f"wrk -t1 -c{a.connections}, {a.rounds} A/B rounds x {a.duration:g} s (creates {creates_s:g} s)",
        "load avg during runs (1 min)": f"{min(loads):.2f}-{max(loads):.2f}",
    }
    verdicts = []
    for ep in ENDPOINTS:
        i, r = series[("ipo", ep)], series[("ref", ep)]
        ratios = [x.rps / y.rps if y.rps else float("nan") for x, y in zip(i.runs, r.runs, strict=True)]
        ratio = statistics.median(ratios)
        cells[ep] = f"ipo {_fmt(i)}; ref {_fmt(r)}; **{ratio:.2f}x** ({min(ratios):.2f}-{max(ratios):.2f})" + (
            f"; non-2xx ipo {sum(x.non_2xx for x in i.runs)} / ref {sum(x.non_2xx for x in r.runs)}"
            if any(x.non_2xx for x in i.runs + r.runs)
            else ""
        )
        if ep in READS:
            verdicts.append(f"{ep} {ratio:.2f}x {'met' if ratio >= 0.8 else 'missed'}")
    cells["target >= 0.8x"] = ", ".join(verdicts)
    record("api_bench_wrk", f"api wrk {db_kind()} {a.duration} {a.rounds} {a.connections}", cells)


if __name__ == "__main__":
    main()
