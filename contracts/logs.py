"""Structured logs, shared by the API, the worker and the ``ipo`` CLI (stdlib only).

One JSON object per line (``ts``, ``level``, ``logger``, ``message``, the bound context and any JSON-able
``extra=`` fields), or a human line when stderr is a terminal. The context (``request_id``, ``job_id``,
``attempt``, ``worker``) lives in context variables, so every line logged while it is bound carries it,
whichever library logged it: bind it with :func:`log_context` around a request or a job.

Context variables follow asyncio tasks and ``run_in_threadpool``, but not a plain ``threading.Thread``:
start threads with ``target=contextvars.copy_context().run`` to keep the context.
"""

from __future__ import annotations

import json
import logging
import logging.config
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any, Literal

LogFormat = Literal["auto", "json", "text"]

request_id_var: ContextVar[str | None] = ContextVar("ipo_request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("ipo_job_id", default=None)
attempt_var: ContextVar[int | None] = ContextVar("ipo_attempt", default=None)
worker_var: ContextVar[str | None] = ContextVar("ipo_worker", default=None)

_CONTEXT: dict[str, ContextVar[Any]] = {
    "request_id": request_id_var,
    "job_id": job_id_var,
    "attempt": attempt_var,
    "worker": worker_var,
}
CONTEXT_FIELDS = tuple(_CONTEXT)

# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# Extras that only repeat the message for another audience (uvicorn's ANSI-coloured copy).
_DROPPED_EXTRAS = frozenset({"color_message"})
_HANDLER_MARK = "_ipo_log_handler"


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Bind ``request_id`` / ``job_id`` / ``attempt`` / ``worker`` for every line logged inside the block."""
    tokens = [(_CONTEXT[name], _CONTEXT[name].set(value)) for name, value in _checked(fields).items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def set_log_context(**fields: Any) -> None:
    """Bind fields for the rest of the current context (a task, a request); an enclosing
    :func:`log_context` that names the same fields restores them when it exits."""
    for name, value in _checked(fields).items():
        _CONTEXT[name].set(value)


def current_log_context() -> dict[str, Any]:
    """The bound fields that are set."""
    return {name: value for name, var in _CONTEXT.items() if (value := var.get()) is not None}


def _checked(fields: dict[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - set(_CONTEXT)
    if unknown:
        raise TypeError(f"unknown log context fields: {sorted(unknown)}")
    return fields


def _context_of(record: logging.LogRecord) -> dict[str, Any]:
    """The context fields of a record: an explicit ``extra=`` wins over the bound context variables."""
    fields = current_log_context()
    for name in CONTEXT_FIELDS:
        value = record.__dict__.get(name)
        if value is not None:
            fields[name] = value
    return fields


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _jsonable(value: Any) -> bool:
    if type(value) in _SCALARS:  # most extras (the access log's method, path, status, duration): no trial dump
        return True
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; newlines in messages and tracebacks stay escaped inside it."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context_of(record))
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRS or key in _DROPPED_EXTRAS or key in entry or key.startswith("_"):
                continue
            if _jsonable(value):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2026-05-09 07:35:25.123 INFO    worker.tasks [job=ftjob-1 attempt=2] claimed`` for people."""

    _LABELS = (("job_id", "job"), ("attempt", "attempt"), ("request_id", "req"), ("worker", "worker"))

    def __init__(self) -> None:
        super().__init__(datefmt="%Y-%m-%d %H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = _context_of(record)
        labels = [f"{label}={fields[name]}" for name, label in self._LABELS if name in fields]
        context = f"[{' '.join(labels)}] " if labels else ""
        when = f"{self.formatTime(record, self.datefmt)}.{int(record.msecs):03d}"
        return f"{when} {record.levelname:<7} {record.name} {context}{record.message}"


def resolve_format(fmt: str, stream: IO[str] | None = None) -> Literal["json", "text"]:
    """``auto`` is ``text`` on a terminal and ``json`` everywhere else (files, pipes, log collectors)."""
    if fmt in ("json", "text"):
        return fmt  # type: ignore[return-value]
    if fmt != "auto":
        raise ValueError(f"unknown log format {fmt!r}: use auto, json or text")
    stream = stream if stream is not None else sys.stderr
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "json"


def make_handler(fmt: str = "auto", stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with the formatter ``fmt`` resolves to.

    Also routes ``warnings`` through logging, so a JSON stream stays JSON. Used by :func:`configure_logging`
    and, through :func:`logging_config`, by ``dictConfig`` in every uvicorn worker process.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if resolve_format(fmt, handler.stream) == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    logging.captureWarnings(True)
    return handler


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.strip().upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}")
    return value


# Libraries that may have put handlers of their own on these loggers: their lines go through ours instead.
_PROPAGATED = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery")
# multiprocessing (and billiard, Celery's fork of it) turns propagation off on its logger whenever it
# creates it, which would leave its lines to Python's bare last-resort handler: it gets ours directly.
_UNPROPAGATED = ("multiprocessing",)


def logging_config(level: str | int = "INFO", fmt: str = "auto") -> dict[str, Any]:
    """The same setup as :func:`configure_logging`, as a ``dictConfig`` dict (uvicorn's ``log_config``,
    which it applies in each of its worker processes too)."""
    resolve_format(fmt)  # fail early on a bad value
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"ipo": {"()": f"{__name__}.make_handler", "fmt": fmt}},
        "root": {"level": _level(level), "handlers": ["ipo"]},
        "loggers": {
            # NOTSET: they follow the root level, whatever level a library (or uvicorn run earlier in this
            # process) left on them; uvicorn's own --log-level still applies after this config.
            **{name: {"handlers": [], "propagate": True, "level": "NOTSET"} for name in _PROPAGATED},
            **{name: {"handlers": ["ipo"], "propagate": False} for name in _UNPROPAGATED},
        },
    }


def configure_logging(level: str | int = "INFO", fmt: str = "auto", stream: IO[str] | None = None) -> None:
    """Install the one root handler (replacing one installed earlier) and set the root level.

    ``fmt``: ``auto`` (JSON unless stderr is a terminal), ``json`` or ``text``. Handlers others put on
    the root logger (pytest's capture) are left alone; the named libraries' own handlers are removed so
    each line is written once, in our format.
    """
    handler = make_handler(fmt, stream)
    root = logging.getLogger()
    root.setLevel(_level(level))
    for logger in (root, *map(logging.getLogger, _UNPROPAGATED)):
        for old in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
    for name in _UNPROPAGATED:
        logging.getLogger(name).propagate = False
    for name in _PROPAGATED:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True
