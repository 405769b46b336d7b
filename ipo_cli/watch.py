"""``ipo jobs watch``: a live progress line from the job's event stream (step of total, loss,
per-token IPO margin vs its target 1/(2*beta), preference accuracy, or a supervised job's token accuracy,
tokens/s, ETA)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ipo_cli.http import ApiClient

TERMINAL = {"succeeded", "failed", "cancelled"}


def _fmt(data: dict[str, Any]) -> str:
    parts = []
    for key, label, fmt in (
        ("train_loss", "loss", "{:.4f}"),
        ("ipo_margin", "margin", "{:.3f}"),
        ("margin_target", "target", "{:.3f}"),
        ("preference_accuracy", "acc", "{:.2f}"),
        ("token_accuracy", "token acc", "{:.2f}"),  # supervised jobs
        ("tokens_per_second", "tok/s", "{:.0f}"),
        ("eta_seconds", "eta", "{:.0f}s"),
    ):
        value = data.get(key)
        if isinstance(value, int | float):
            parts.append(f"{label} {fmt.format(value)}")
    return "  ".join(parts)


def watch_job(client: ApiClient, job_id: str, console: Console | None = None) -> str:
    console = console or Console(stderr=False)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(job_id, total=None, info="waiting for a worker")
        for event in client.stream_events(job_id):
            data = event.get("data") or {}
            if event.get("type") == "metrics" and isinstance(data.get("step"), int):
                bar.update(task, completed=data["step"], total=data.get("total_steps"), info=_fmt(data))
            else:
                bar.console.print(f"[dim]{event['message']}[/dim]")
    job = client.json("GET", f"/v1/fine_tuning/jobs/{job_id}")
    status = str(job["status"])
    if job.get("error"):
        console.print(f"[red]{status}: {job['error']['message']}[/red]")
    else:
        console.print(
            f"[bold]{status}[/bold]" + (f": {job['fine_tuned_model']}" if job.get("fine_tuned_model") else "")
        )
    return status
