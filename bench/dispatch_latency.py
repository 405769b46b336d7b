"""Dispatch latency: job submitted -> ``running`` (claimed) with an idle worker.

    python -m bench.dispatch_latency [--jobs N]

``ipo serve`` (dispatcher on, the default) + ``ipo worker`` on a fresh database, with Redis at
``BENCH_REDIS_URL`` (a private db number and queue name) or else the embedded filesystem broker.
To keep each job short, the worker is given an empty models directory: it claims the job (the moment
measured), then fails it at once with ``model_not_found``; the API's models directory has the model, so
creation is accepted. Between jobs the bench waits for the job to fail, then 0.5 s more (the worker's
pool process stays warm between jobs; each job's trainer is a fresh process of its own).

Two figures per job: client-observed (clock before POST create -> first GET, polled every 10 ms, that
shows ``running`` or later) and server-side (``jobs.started_at - jobs.created_at`` in the database: the
claim's timestamp minus the insert's, no polling error). Target: p50 < 300 ms.
The reference figure is the API's own create round trip measured in the same run (a floor).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import httpx

from bench._common import db_kind, pct, record, redis_url, stack, wait_for_quiet
from bench.train_throughput import method_block

PENDING = ("validating_files", "queued")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=0, help="default: 100 with Redis, 40 with the filesystem broker")
    p.add_argument(
        "--dispatch-interval",
        type=float,
        default=None,
        help="IPO_DISPATCH_INTERVAL_SECONDS for the API (default: the project's default, 1.0)",
    )
    a = p.parse_args()
    n = a.jobs or (100 if redis_url() else 40)
    broker = "redis" if redis_url() else "filesystem"
    wait_for_quiet()
    import tempfile

    from worker.training.demo_data import write_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        data = write_demo_data(tmp)[0].read_bytes()
        empty_models = Path(tmp) / "no-models"
        empty_models.mkdir()
        api_env = {"IPO_DISPATCH_INTERVAL_SECONDS": str(a.dispatch_interval)} if a.dispatch_interval else {}
        with stack("dispatch", worker=True, api_env=api_env, worker_env={"IPO_MODELS_DIR": str(empty_models)}) as st:
            client_ms: list[float] = []
            create_ms: list[float] = []
            ids: list[str] = []
            with httpx.Client(base_url=st.url, headers=st.headers, timeout=30) as c:
                f = c.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", data)})
                f.raise_for_status()
                body = {"model": "tiny-mistral", "training_file": f.json()["id"], "method": method_block(1)}
                time.sleep(2.0)
                for i in range(n):
                    t0 = time.perf_counter()
                    r = c.post("/v1/fine_tuning/jobs", json=body)
                    create_ms.append((time.perf_counter() - t0) * 1e3)
                    r.raise_for_status()
                    job_id = r.json()["id"]
                    ids.append(job_id)
                    seen = None
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        status = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
                        if seen is None and status not in PENDING:
                            seen = (time.perf_counter() - t0) * 1e3
                        if status in ("failed", "succeeded", "cancelled"):
                            break
                        time.sleep(0.01)
                    if seen is None:
                        raise RuntimeError(f"{job_id} never left {PENDING}; logs in {st.tmp}/logs")
                    client_ms.append(seen)
                    time.sleep(0.5)  # the worker is idle again
                    if (i + 1) % 10 == 0:
                        print(f"  {i + 1}/{n}: last {seen:.0f} ms", flush=True)
            server_ms = server_side(st.database_url, ids)
    cells = {
        "broker / db": f"{broker} / {db_kind()}"
        + (f", IPO_DISPATCH_INTERVAL_SECONDS={a.dispatch_interval}" if a.dispatch_interval else ""),
        "jobs": str(n),
        "submit->running (client, 10 ms poll)": f"p50 {pct(client_ms, 50):.0f} ms, p99 {pct(client_ms, 99):.0f} ms",
        "created_at->started_at (server)": f"p50 {pct(server_ms, 50):.0f} ms, p99 {pct(server_ms, 99):.0f} ms",
        "reference: create round trip": f"p50 {pct(create_ms, 50):.1f} ms",
        "ratio / target": f"client p50 = {pct(client_ms, 50) / pct(create_ms, 50):.0f}x the create round trip; "
        f"p50 < 300 ms: {'met' if pct(client_ms, 50) < 300 else 'missed'}",
    }
    record("dispatch_latency", f"dispatch {broker} {db_kind()} {n} {a.dispatch_interval}", cells)


def server_side(database_url: str, ids: list[str]) -> list[float]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    out = []
    with engine.connect() as conn:
        for job_id in ids:
            created, started = conn.execute(
                text("SELECT created_at, started_at FROM jobs WHERE id = :id"), {"id": job_id}
            ).one()
            if isinstance(created, str):  # SQLite stores ISO text
                from datetime import datetime

                created, started = datetime.fromisoformat(created), datetime.fromisoformat(started)
            out.append((started - created).total_seconds() * 1e3)
    engine.dispose()
    return out


if __name__ == "__main__":
    main()
