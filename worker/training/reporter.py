"""How the trainer reports progress: a small protocol, a JSON-lines implementation for the child
process (``contracts.internal.TrainerReport`` lines on a pipe) and an in-memory one for tests."""

from __future__ import annotations

import os
import time
from typing import Any, Literal, Protocol

from contracts.internal import TrainerReport

Level = Literal["info", "warn", "error"]


class Reporter(Protocol):
    def event(self, message: str, level: Level = "info", data: dict[str, Any] | None = None) -> None: ...
    def metrics(self, data: dict[str, Any]) -> None: ...
    def resolved(self, hparams: dict[str, Any]) -> None: ...
    def checkpoint(self, step: int, path: str, metrics: dict[str, Any] | None = None) -> None: ...
    def artifact(self, name: str, path: str) -> None: ...
    def done(self, trained_tokens: int) -> None: ...
    def error(self, code: str, message: str) -> None: ...


class _ReportBuilder:
    """Builds ``TrainerReport`` objects; subclasses decide where they go (``emit``)."""

    def emit(self, report: TrainerReport) -> None:
        raise NotImplementedError

    def _emit(self, kind: str, **fields: Any) -> None:
        self.emit(TrainerReport(kind=kind, time=time.time(), **fields))

    def event(self, message: str, level: Level = "info", data: dict[str, Any] | None = None) -> None:
        self._emit("event", message=message, level=level, data=data)

    def metrics(self, data: dict[str, Any]) -> None:
        step = data.get("step")
        self._emit("metrics", data=data, step=int(step) if step is not None else None)

    def resolved(self, hparams: dict[str, Any]) -> None:
        self._emit("resolved", data=hparams)

    def checkpoint(self, step: int, path: str, metrics: dict[str, Any] | None = None) -> None:
        self._emit("checkpoint", step=step, path=path, data=metrics or {})

    def artifact(self, name: str, path: str) -> None:
        self._emit("artifact", name=name, path=path)

    def done(self, trained_tokens: int) -> None:
        self._emit("done", data={"trained_tokens": int(trained_tokens)})

    def error(self, code: str, message: str) -> None:
        self._emit("error", level="error", code=code, message=message[:4000])


class JsonLinesReporter(_ReportBuilder):
    """Writes one JSON ``TrainerReport`` per line to file descriptor ``fd``, flushed per line."""

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(fd, "w", encoding="utf-8", buffering=1, closefd=False)

    def emit(self, report: TrainerReport) -> None:
        self._file.write(report.model_dump_json(exclude_none=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ListReporter(_ReportBuilder):
    """Keeps the reports in memory (tests, in-process runs)."""

    def __init__(self) -> None:
        self.reports: list[TrainerReport] = []

    def emit(self, report: TrainerReport) -> None:
        self.reports.append(report)

    def of_kind(self, kind: str) -> list[TrainerReport]:
        return [r for r in self.reports if r.kind == kind]
