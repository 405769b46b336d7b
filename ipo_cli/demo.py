"""``ipo demo`` (what ``make demo`` runs): a real IPO job end to end on the embedded default.

Builds the tiny model and demo data if missing, starts ``ipo up``, uploads the data and submits an
IPO job over HTTP, shows live progress, downloads the adapter, then compares base vs base+adapter on
held-out prompts (preference accuracy and the rate of correct sampled replies), and stops everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ipo_cli.downloads import download_adapter
from ipo_cli.errors import CliError
from ipo_cli.http import ApiClient
from ipo_cli.processes import free_port, stop_group, wait_http_ok
from ipo_cli.watch import watch_job

console = Console()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    try:
        wait_http_ok(f"{url}/readyz", [proc], timeout)
    except RuntimeError as exc:
        raise CliError(f"`ipo up` did not become ready: {exc}", 4) from exc


def _evaluate(model: Path, data: Path, adapter: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "worker.training.evaluate", "--model", str(model), "--data", str(data), "--json"]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise CliError(
            f"evaluation failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}", 1
        )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_demo() -> int:
    from app.settings import Settings

    settings = Settings()
    var = settings.var_dir
    model_dir = settings.resolved_models_dir / "tiny-mistral"
    data_dir = var / "data"
    started = time.monotonic()
    if not (model_dir / "config.json").exists():
        console.rule("1/5 building the tiny Mistral-architecture model (local, no download)")
        from worker.training.tiny import build_tiny_model

        build_tiny_model(model_dir)
    if not (data_dir / "train.jsonl").exists():
        from worker.training.demo_data import write_demo_data

        write_demo_data(data_dir)
    console.rule("2/5 starting the service (ipo up: API + dispatcher + one Celery worker)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "IPO_API_URL": url, "PYTHONUNBUFFERED": "1"}
    log_path = var / "demo-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ipo_cli.main", "up", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_ready(url, proc)
        client = ApiClient(url)
        console.rule("3/5 uploading data and submitting an IPO job over HTTP")
        train = client.upload(data_dir / "train.jsonl")
        valid = client.upload(data_dir / "valid.jsonl")
        job = client.json(
            "POST",
            "/v1/fine_tuning/jobs",
            json={
                "model": "tiny-mistral",
                "training_file": train["id"],
                "validation_file": valid["id"],
                "suffix": "demo",
                "seed": 0,
                "method": {"type": "ipo"},
            },
        )
        console.print(f"job {job['id']} ({train['id']}: {train['bytes']} bytes, validated)")
        status = watch_job(client, job["id"], console)
        if status != "succeeded":
            console.print(f"[red]the job ended {status}; server log: {log_path}[/red]")
            return 1
        job = client.json("GET", f"/v1/fine_tuning/jobs/{job['id']}")
        console.print(f"resolved hyperparameters: {json.dumps(job.get('resolved_hyperparameters'))}")
        console.rule("4/5 downloading the adapter")
        adapter = download_adapter(client, job["id"], var / "demo" / "adapter")
        console.print(f"adapter unpacked in {adapter}: {sorted(p.name for p in adapter.iterdir())}")
    finally:
        stop_group(proc, timeout=150)  # ipo up waits up to 90 s for its worker's warm shutdown
    console.rule("5/5 base vs base + adapter on held-out prompts")
    before = _evaluate(model_dir, data_dir / "valid.jsonl", None)
    after = _evaluate(model_dir, data_dir / "valid.jsonl", adapter)
    _report(before, after)
    console.print(f"demo finished in {time.monotonic() - started:.0f}s")
    return 0


def _report(before: dict[str, Any], after: dict[str, Any]) -> None:
    table = Table(title=f"held-out evaluation ({before['n_pairs']} pairs, {before['n_samples']} sampled replies)")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("base + IPO adapter", justify="right")
    for key, label in (
        ("preference_accuracy", "preference accuracy (chosen more likely per token)"),
        ("mean_margin_per_token", "mean per-token log-prob margin"),
        ("behaviour_rate", "sampled replies that answer correctly"),
    ):
        table.add_row(label, f"{before[key]:.3f}", f"{after[key]:.3f}")
    console.print(table)
    for label, result in (("base", before), ("base + IPO adapter", after)):
        console.print(f"[bold]{label}[/bold] sampled replies:")
        for ex in (result.get("examples") or [])[:4]:
            mark = "[green]ok[/green]" if ex.get("preferred") == "true" else "[red]no[/red]"
            console.print(f"  {mark}  Q: {ex['prompt']}  A: {ex['reply']}")
