"""``ipo jobs watch`` output: warnings stand out from progress notes, the IPO margin is shown against its
target, and the bar never reads ``0/None`` before the first step."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rich.console import Console

from ipo_cli.watch import watch_job

EVENTS: list[dict[str, Any]] = [
    {"type": "message", "level": "info", "message": "Attempt 1 started on worker w-1", "data": None},
    {"type": "message", "level": "warn", "message": "beta 0.1 sets IPO's margin target [5 nats]", "data": None},
    {
        "type": "metrics",
        "level": "info",
        "message": "Step 1/4",
        "data": {"step": 1, "total_steps": 4, "train_loss": 24.9, "ipo_margin": 0.02, "ipo_margin_target": 5.0},
    },
]


class FakeClient:
    def stream_events(self, job_id: str) -> Iterator[dict[str, Any]]:
        yield from EVENTS

    def json(self, method: str, path: str) -> dict[str, Any]:
        return {"status": "succeeded", "fine_tuned_model": "ft:tiny-mistral:x", "error": None}


def test_watch_marks_warnings_and_shows_the_margin_target() -> None:
    console = Console(record=True, width=200, color_system="truecolor", force_terminal=True)
    assert watch_job(FakeClient(), "ftjob-1", console) == "succeeded"  # type: ignore[arg-type]
    text = console.export_text(clear=False)
    assert "warning: beta 0.1 sets IPO's margin target [5 nats]" in text  # escaped: brackets are not markup
    assert "Attempt 1 started" in text and "warning: Attempt" not in text
    assert "margin 0.020  target 5.000" in text
    assert "None" not in text
    styled = console.export_text(styles=True)
    assert "\x1b[33mwarning: beta" in styled  # yellow, while progress notes stay dim
