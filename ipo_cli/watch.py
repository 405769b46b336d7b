"""``ipo jobs watch``: a live progress line from the job's event stream (step of total, loss,
per-token IPO margin vs its target 1/(2*beta), preference accuracy, or a supervised job's token accuracy,
tokens/s, ETA)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ipo_cli.http import ApiClient

TERMINAL = {"succeeded", "failed", "cancelled"}


def _fmt(data: dict[str, Any]) -> str:
    parts = []
    for key, label, fmt in (
        ("train_loss", "loss", "{:.4f}"),
        ("ipo_margin", "margin", "{:.3f}"),
        ("ipo_margin_target", "target", "{:.3f}"),
        ("preference_accuracy", "acc", "{:.2f}"),
        ("token_accuracy", "token acc", "{:.2f}"),  # supervised jobs
        ("tokens_per_second", "tok/s", "{:.0f}"),
        ("eta_seconds", "eta", "{:.0f}s"),
    ):
        value = data.get(key)
        if isinstance(value, int | float):
            parts.append(f"{label} {fmt.format(value)}")
    return "  ".join(parts)


EVENT_STYLES = {"warn": ("yellow", "warning: "), "error": ("red", "error: ")}
"""How ``watch`` prints an event by level (anything else dim): a warning must not read like a progress note."""


def _event_line(event: dict[str, Any]) -> str:
    style, prefix = EVENT_STYLES.get(str(event.get("level")), ("dim", ""))
    return f"[{style}]{prefix}{escape(str(event.get('message', '')))}[/{style}]"


def watch_job(client: ApiClient, job_id: str, console: Console | None = None) -> str:
    console = console or Console(stderr=False)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),  # "0/?" until the first step says the total
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
                bar.console.print(_event_line(event))
    job = client.json("GET", f"/v1/fine_tuning/jobs/{job_id}")
    status = str(job["status"])
    if job.get("error"):
        console.print(f"[red]{status}: {job['error']['message']}[/red]")
    else:
        console.print(
            f"[bold]{status}[/bold]" + (f": {job['fine_tuned_model']}" if job.get("fine_tuned_model") else "")
        )
    return status
