"""Memory footprint: the API (idle and under load, and that it never loads torch), an idle worker,
and the trainer child's peak RSS on the tiny model.

    python -m bench.footprint [--trainer-steps 10]

- API: ``ipo serve`` RSS 2 s after ready, peak RSS (sampled every 50 ms) during 1,000 mixed requests at
  50 clients, and a scan of /proc/PID/maps for any torch shared library (libtorch*, torch/_C). The
  reference in the same run is a bare ``python -c "import fastapi, sqlalchemy, uvicorn"`` process.
- Worker: ``ipo worker`` idle RSS of the main process and its prefork pool child (RSS and USS).
- Trainer: ``python -m worker.training.run`` on the tiny model and demo data (the demo's own "auto"
  hyperparameters, ``--trainer-steps`` steps); peak = VmHWM from /proc/PID/status, read until it exits.
Target: API RSS < 150 MB, no torch in the API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from bench._common import ROOT, record, stack, tiny_model_dir, wait_for_quiet
from bench.train_throughput import method_block

MB = 1024 * 1024


def torch_libs(pid: int) -> list[str]:
    libs = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if "libtorch" in path or "/torch/" in path:
            libs.add(path)
    return sorted(libs)


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def api_footprint(data: bytes) -> dict[str, float | str]:
    with stack("footprint-api") as st:
        proc = psutil.Process(st.api.pid)
        time.sleep(2.0)
        idle = proc.memory_info().rss
        peak = [idle]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        async def load() -> None:
            limits = httpx.Limits(max_connections=50)
            async with httpx.AsyncClient(base_url=st.url, headers=st.headers, timeout=120, limits=limits) as c:
                f = await c.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", data)})
                f.raise_for_status()
                body = {"model": "tiny-mistral", "training_file": f.json()["id"], "method": method_block(1)}
                sem = asyncio.Semaphore(10)  # creates: few at once (SQLite has one writer)

                async def create() -> str | None:
                    async with sem:
                        r = await c.post("/v1/fine_tuning/jobs", json=body)
                        return r.json().get("id") if r.status_code == 200 else None

                ids = [i for i in await asyncio.gather(*(create() for _ in range(100))) if i]
                paths = [f"/v1/fine_tuning/jobs/{ids[k % len(ids)]}" for k in range(300)]
                paths += ["/v1/fine_tuning/jobs?limit=100"] * 300
                paths += [f"/v1/fine_tuning/jobs/{ids[k % len(ids)]}/events?limit=100" for k in range(300)]
                it = iter(paths)

                async def worker() -> None:
                    for path in it:
                        await c.get(path)

                await asyncio.gather(*(worker() for _ in range(50)))

        asyncio.run(load())
        stop.set()
        sampler.join()
        libs = torch_libs(st.api.pid)
        modules = proc.memory_maps()  # noqa: F841  (psutil view; maps scan above is the check)
    return {"idle": idle / MB, "peak": peak[0] / MB, "torch": ", ".join(libs) or "none"}


def reference_rss() -> float:
    p = subprocess.Popen([sys.executable, "-c", "import fastapi, sqlalchemy, uvicorn, pydantic, time; time.sleep(30)"])
    try:
        time.sleep(3.0)
        return psutil.Process(p.pid).memory_info().rss / MB
    finally:
        p.kill()
        p.wait()


def worker_footprint() -> dict[str, float]:
    with stack("footprint-worker", worker=True) as st:
        assert st.worker is not None
        time.sleep(3.0)
        main = psutil.Process(st.worker.pid)
        # ``ipo worker`` is the Celery main process; its pool child is the one that runs jobs
        kids = main.children(recursive=True)
        main_rss = main.memory_info().rss / MB
        kid_rss = sum(k.memory_info().rss for k in kids) / MB
        uss = (main.memory_full_info().uss + sum(k.memory_full_info().uss for k in kids)) / MB
        return {"main": main_rss, "children": kid_rss, "n_children": len(kids), "uss_total": uss}


def trainer_footprint(steps: int) -> dict[str, float]:
    from worker.training.demo_data import write_demo_data

    with tempfile.TemporaryDirectory(prefix="ipo-bench-trainer-") as tmp:
        train, _ = write_demo_data(Path(tmp) / "data")
        method = {"type": "ipo", "ipo": {"hyperparameters": {"max_steps": steps}}}
        req = {
            "job_id": "ftjob-bench",
            "attempt": 1,
            "model_path": str(tiny_model_dir()),
            "train_file": str(train),
            "output_dir": str(Path(tmp) / "out"),
            "seed": 42,
            "method": method,
            "device": "cpu",
        }
        path = Path(tmp) / "request.json"
        path.write_text(json.dumps(req))
        t0 = time.monotonic()
        p = subprocess.Popen(
            [sys.executable, "-m", "worker.training.run", str(path), "--report-fd", "1"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        peak = 0
        while p.poll() is None:
            with contextlib.suppress(OSError, ValueError):  # it may exit between poll() and the read
                peak = max(peak, vm_hwm(p.pid))
            time.sleep(0.1)
        if p.returncode != 0:
            raise RuntimeError(f"trainer exited {p.returncode}")
        return {"peak": peak / MB, "wall": time.monotonic() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer-steps", type=int, default=10)
    a = p.parse_args()
    _ = method_block  # same request shapes as the other benches
    wait_for_quiet()
    from worker.training.demo_data import write_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        data = write_demo_data(tmp)[0].read_bytes()
    api = api_footprint(data)
    ref = reference_rss()
    wk = worker_footprint()
    tr = trainer_footprint(a.trainer_steps)
    cells = {
        "API RSS": f"idle {api['idle']:.0f} MB, peak under load {api['peak']:.0f} MB (target < 150 MB: "
        f"{'met' if float(api['peak']) < 150 else 'missed'})",
        "torch in API": str(api["torch"]),
        "reference (bare fastapi+sqlalchemy+uvicorn import)": f"{ref:.0f} MB; "
        f"API idle = {float(api['idle']) / ref:.2f}x",
        "worker idle": f"main {wk['main']:.0f} MB + {wk['n_children']:.0f} pool child(ren) "
        f"{wk['children']:.0f} MB RSS; USS total {wk['uss_total']:.0f} MB",
        "trainer peak (VmHWM)": f"{tr['peak']:.0f} MB ({a.trainer_steps} steps, {tr['wall']:.0f} s)",
    }
    record("footprint", f"footprint {a.trainer_steps}", cells)


if __name__ == "__main__":
    main()
