"""Public API latency and throughput at 50 concurrent clients, ipo-align vs a minimal reference app.

    python -m bench.api_bench [--requests 2000] [--concurrency 50]

Starts ``ipo serve`` (uvicorn, one process; ``IPO_RUN_DISPATCHER=false`` so created jobs stay queued and
the dispatcher's broker sends are not part of the create figure; rate limit and active-job cap off) and
bench/reference_api.py, each on a fresh database: SQLite by default, a new Postgres database next to
``BENCH_DATABASE_URL`` when set. For each server, in this order: N creates, N retrieves, N list pages
(20 jobs), N event pages (creates: ``--creates``), from ``--concurrency`` asyncio clients (httpx, loopback, keep-alive).
Reports p50/p99 latency and requests/s per endpoint and the throughput ratio ipo/reference.
Targets: >= 0.8x the reference's requests/s; p99 retrieve < 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench._common import (
    db_kind,
    free_port,
    fresh_database,
    pct,
    record,
    stack,
    start_process,
    stop_process,
    wait_for_quiet,
    wait_http,
)
from bench.train_throughput import method_block

ENDPOINTS = ("create", "retrieve", "list", "events")


async def load(
    url: str, headers: dict[str, str], n: int, concurrency: int, make: Callable[[int], tuple[str, str, Any]]
) -> tuple[list[float], float, list[Any], int]:
    """``n`` requests from ``concurrency`` clients; returns (latencies s, elapsed s, 200 bodies, non-200 count).

    Every request counts in the latency figures; requests/s counts only 200 answers."""
    latencies: list[float] = []
    bodies: list[Any] = []
    errors: dict[str, int] = {}
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=15) as client:

        async def one_client() -> None:
            for i in counter:
                method, path, body = make(i)
                t0 = time.perf_counter()
                try:
                    r = await client.request(method, path, json=body)
                except httpx.TransportError as exc:
                    latencies.append(time.perf_counter() - t0)
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors[f"{r.status_code} {r.text[:120]}"] = errors.get(f"{r.status_code} {r.text[:120]}", 0) + 1
                    continue
                bodies.append(r.json())

        # warm-up: a few requests outside the measurement
        for i in range(min(20, n)):
            method, path, _ = make(-1 - i)
            if method == "GET":
                await client.get(path)
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    for message, count in errors.items():
        print(f"    {count} x {message}", flush=True)
    return latencies, elapsed, bodies, sum(errors.values())


def run_suite(
    url: str, headers: dict[str, str], file_id: str, n: int, concurrency: int, creates: int
) -> dict[str, dict[str, float]]:
    create_body = {"model": "tiny-mistral", "training_file": file_id, "method": method_block(10)}
    ids: list[str] = []
    rng = random.Random(0)
    out: dict[str, dict[str, float]] = {}
    makers: dict[str, Callable[[int], tuple[str, str, Any]]] = {
        "create": lambda i: ("POST", "/v1/fine_tuning/jobs", create_body) if i >= 0 else ("SKIP", "", None),
        "retrieve": lambda i: ("GET", f"/v1/fine_tuning/jobs/{rng.choice(ids)}", None),
        "list": lambda i: ("GET", "/v1/fine_tuning/jobs?limit=20", None),
        "events": lambda i: ("GET", f"/v1/fine_tuning/jobs/{rng.choice(ids)}/events?limit=20", None),
    }
    for name in ENDPOINTS:
        count = creates if name == "create" else n
        lat, elapsed, bodies, errors = asyncio.run(load(url, headers, count, concurrency, makers[name]))
        if name == "create":
            ids = [b["id"] for b in bodies]
            if not ids:
                raise RuntimeError("no job was created")
        out[name] = {
            "p50_ms": pct(lat, 50) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3,
            "rps": len(bodies) / elapsed,
            "errors": errors,
        }
        print(
            f"  {name:8s} p50 {out[name]['p50_ms']:6.1f} ms  p99 {out[name]['p99_ms']:6.1f} ms  "
            f"{out[name]['rps']:7.1f} ok req/s  {errors} errors",
            flush=True,
        )
    return out


def bench_ipo(data: bytes, n: int, concurrency: int, creates: int) -> dict[str, dict[str, float]]:
    with stack("api", api_env={"IPO_RUN_DISPATCHER": "false"}) as st:
        r = httpx.post(
            f"{st.url}/v1/files",
            headers=st.headers,
            data={"purpose": "fine-tune"},
            files={"file": ("train.jsonl", data)},
            timeout=60,
        )
        r.raise_for_status()
        print(f"ipo-align at {st.url} ({db_kind()})", flush=True)
        return run_suite(st.url, st.headers, r.json()["id"], n, concurrency, creates)


def bench_reference(n: int, concurrency: int, creates: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="ipo-bench-refapi-") as tmp, fresh_database(Path(tmp), "refapi") as db:
        port = free_port()
        key, file_id = "ipo-sk-" + secrets.token_hex(32), "file-" + secrets.token_hex(12)
        log = Path(tmp) / "ref.log"
        proc = start_process(
            [
                sys.executable,
                "bench/reference_api.py",
                "--port",
                str(port),
                "--database-url",
                db,
                "--api-key",
                key,
                "--file-id",
                file_id,
            ],
            {},
            log,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/healthz", [proc], log)
            print(f"reference at {url} ({db_kind()})", flush=True)
            return run_suite(url, {"Authorization": f"Bearer {key}"}, file_id, n, concurrency, creates)
        finally:
            stop_process(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="requests per endpoint")
    p.add_argument(
        "--creates",
        type=int,
        default=200,
        help="job creates (fewer: on SQLite 50 concurrent writers queue behind one write lock)",
    )
    p.add_argument("--concurrency", type=int, default=50)
    a = p.parse_args()
    wait_for_quiet()
    from worker.training.demo_data import write_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        data = write_demo_data(tmp)[0].read_bytes()
    ipo = bench_ipo(data, a.requests, a.concurrency, a.creates)
    ref = bench_reference(a.requests, a.concurrency, a.creates)
    cells: dict[str, str] = {
        "db": db_kind(),
        "requests x clients": f"{a.creates} creates, {a.requests} others x {a.concurrency}",
    }
    verdicts = []
    for name in ENDPOINTS:
        i, r = ipo[name], ref[name]
        ratio = i["rps"] / r["rps"]
        cells[name] = (
            f"ipo p50 {i['p50_ms']:.1f} / p99 {i['p99_ms']:.1f} ms, {i['rps']:.0f} rps; "
            f"ref p50 {r['p50_ms']:.1f} / p99 {r['p99_ms']:.1f} ms, {r['rps']:.0f} rps; "
            f"**{ratio:.2f}x**"
            + (f"; errors ipo {i['errors']:.0f} / ref {r['errors']:.0f}" if i["errors"] or r["errors"] else "")
        )
        verdicts.append(f"{name} {ratio:.2f}x {'met' if ratio >= 0.8 else 'missed'}")
    cells["targets"] = (
        f">= 0.8x: {', '.join(verdicts)}; p99 retrieve {ipo['retrieve']['p99_ms']:.1f} ms < 20 ms: "
        f"{'met' if ipo['retrieve']['p99_ms'] < 20 else 'missed'}"
    )
    record("api_bench", f"api {db_kind()} {a.requests} {a.creates} {a.concurrency}", cells)


if __name__ == "__main__":
    main()
