from __future__ import annotations

import json
import os

from contracts.internal import TrainerReport
from worker.training.reporter import JsonLinesReporter, ListReporter, Reporter


def _exercise(reporter: Reporter) -> None:
    reporter.resolved({"beta": 0.1})
    reporter.event("hello", level="warn", data={"x": 1})
    reporter.metrics({"step": 3, "train_loss": 0.5})
    reporter.checkpoint(3, "/tmp/ckpt/step-3", {"train_loss": 0.5})
    reporter.artifact("adapter", "/tmp/adapter")
    reporter.done(1234)
    reporter.error("nan_loss", "boom")


def test_json_lines_round_trip() -> None:
    read_fd, write_fd = os.pipe()
    reporter = JsonLinesReporter(write_fd)
    _exercise(reporter)
    reporter.close()
    os.close(write_fd)
    with os.fdopen(read_fd, encoding="utf-8") as f:
        lines = f.read().splitlines()
    reports = [TrainerReport.model_validate(json.loads(line)) for line in lines]
    memory = ListReporter()
    _exercise(memory)
    assert [r.model_dump(exclude={"time"}) for r in reports] == [r.model_dump(exclude={"time"}) for r in memory.reports]
    kinds = [r.kind for r in reports]
    assert kinds == ["resolved", "event", "metrics", "checkpoint", "artifact", "done", "error"]
    assert reports[2].step == 3 and reports[3].path == "/tmp/ckpt/step-3" and reports[4].name == "adapter"
    assert reports[5].data == {"trained_tokens": 1234} and reports[6].code == "nan_loss"
    assert all(r.time is not None for r in reports)
