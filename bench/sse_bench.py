"""SSE fan-out: 200 concurrent event streams on one job; delivery latency and the API's CPU.

    python -m bench.sse_bench [--clients 200] [--events 20] [--interval 0.5]

``ipo serve`` on a fresh database (dispatcher off); the bench uploads a file, creates a job, claims it
over ``/internal/v1`` with the worker token (as a worker would), opens ``--clients`` streams
(``Accept: text/event-stream``, asyncio + httpx), then injects ``--events`` events through
``POST /internal/v1/jobs/{id}/events``, each carrying its injection time. Delivery latency = receive
time - injection time, over every (client, event). API CPU (psutil, user+sys of the ``ipo serve``
process) is measured twice: with the streams connected and idle (the reference: what merely holding
the streams costs), and while events are injected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

import httpx
import psutil

from bench._common import db_kind, pct, record, stack, wait_for_quiet
from bench.train_throughput import method_block


async def run(st, n_clients: int, n_events: int, interval: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from worker.training.demo_data import write_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        data = write_demo_data(tmp)[0].read_bytes()
    limits = httpx.Limits(max_connections=n_clients + 20, max_keepalive_connections=n_clients + 20)
    async with httpx.AsyncClient(base_url=st.url, headers=st.headers, timeout=60, limits=limits) as c:
        f = await c.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", data)})
        f.raise_for_status()
        r = await c.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tiny-mistral", "training_file": f.json()["id"], "method": method_block(1)},
        )
        r.raise_for_status()
        job_id = r.json()["id"]
        for _ in range(100):
            if (await c.get(f"/v1/fine_tuning/jobs/{job_id}")).json()["status"] == "queued":
                break
            await asyncio.sleep(0.1)
        claim = await c.post(
            f"/internal/v1/jobs/{job_id}/claim", json={"worker_id": "bench-sse"}, headers=st.internal_headers
        )
        claim.raise_for_status()
        lease = claim.json()["lease_token"]

        latencies: list[float] = []
        connected = 0
        received = [0] * n_clients

        async def client(i: int) -> None:
            nonlocal connected
            async with c.stream(
                "GET", f"/v1/fine_tuning/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}, timeout=None
            ) as resp:
                resp.raise_for_status()
                connected += 1
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    msg = json.loads(line[6:]).get("message", "")
                    if msg.startswith("bench-inject "):
                        latencies.append(time.time() - float(msg.split()[1]))
                        received[i] += 1

        tasks = [asyncio.create_task(client(i)) for i in range(n_clients)]
        t_conn = time.monotonic()
        while connected < n_clients:
            if time.monotonic() - t_conn > 60:
                raise RuntimeError(f"only {connected}/{n_clients} streams connected")
            await asyncio.sleep(0.05)
        connect_s = time.monotonic() - t_conn
        proc = psutil.Process(st.api.pid)

        def cpu() -> float:
            t = proc.cpu_times()
            return t.user + t.system

        await asyncio.sleep(1.0)
        c0, w0 = cpu(), time.monotonic()
        await asyncio.sleep(5.0)
        idle_cpu = (cpu() - c0) / (time.monotonic() - w0) * 100

        c0, w0 = cpu(), time.monotonic()
        for seq in range(n_events):
            now = time.time()
            ev = {"seq": seq, "type": "message", "message": f"bench-inject {now:.6f}", "created_at": int(now)}
            r = await c.post(
                f"/internal/v1/jobs/{job_id}/events",
                json={"lease_token": lease, "events": [ev]},
                headers=st.internal_headers,
            )
            r.raise_for_status()
            await asyncio.sleep(interval)
        deadline = time.monotonic() + 15
        while sum(received) < n_clients * n_events and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        busy_cpu = (cpu() - c0) / (time.monotonic() - w0) * 100
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "connect_s": connect_s,
        "idle_cpu": idle_cpu,
        "busy_cpu": busy_cpu,
        "p50_ms": pct(latencies, 50) * 1e3,
        "p99_ms": pct(latencies, 99) * 1e3,
        "max_ms": max(latencies) * 1e3 if latencies else float("nan"),
        "delivered": len(latencies),
        "expected": n_clients * n_events,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--events", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between injected events")
    a = p.parse_args()
    wait_for_quiet()
    with stack("sse", api_env={"IPO_RUN_DISPATCHER": "false"}) as st:
        res = asyncio.run(run(st, a.clients, a.events, a.interval))
    print(res)
    cells = {
        "db": db_kind(),
        "clients x events": f"{a.clients} x {a.events} every {a.interval}s",
        "delivered": f"{res['delivered']}/{res['expected']}",
        "latency": f"p50 {res['p50_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms, max {res['max_ms']:.0f} ms",
        "API CPU (one core = 100%)": f"idle streams {res['idle_cpu']:.0f}%, injecting {res['busy_cpu']:.0f}%",
        "ratio": f"injecting/idle CPU = {res['busy_cpu'] / max(res['idle_cpu'], 0.1):.2f}x; "
        f"p99 / server poll interval (500 ms) = {res['p99_ms'] / 500:.2f}x",
        "connect 200 streams": f"{res['connect_s']:.1f} s",
    }
    record("sse_bench", f"sse {db_kind()} {a.clients} {a.events} {a.interval}", cells)


if __name__ == "__main__":
    main()
