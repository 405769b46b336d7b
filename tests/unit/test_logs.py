"""contracts.logs: JSON lines with the bound context, the human format, format resolution, config."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import logging.config
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from contracts.logs import (
    JsonFormatter,
    TextFormatter,
    configure_logging,
    current_log_context,
    log_context,
    make_handler,
    resolve_format,
    set_log_context,
)

log = logging.getLogger("tests.logs")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging and dictConfig change process-wide state: put it back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    named = {
        name: (list(lg.handlers), lg.propagate)
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "multiprocessing")
        if (lg := logging.getLogger(name))
    }
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        for name, (old, propagate) in named.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = old
            logger.propagate = propagate
        logging.captureWarnings(False)


def _lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def test_json_lines_carry_the_bound_context_extras_and_exceptions() -> None:
    buf = io.StringIO()
    configure_logging("INFO", "json", stream=buf)
    with log_context(request_id="req-1", job_id="ftjob-abc", attempt=2, worker="host:1"):
        log.info("step %d\nof many", 3, extra={"step": 3, "loss": 0.5, "obj": object()})
        try:
            raise ValueError("bad thing")
        except ValueError:
            log.exception("failed")
    log.info("outside")
    log.debug("below the level")
    first, second, third = (json.loads(line) for line in _lines(buf))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert first["level"] == "INFO" and first["logger"] == "tests.logs" and first["message"] == "step 3\nof many"
    assert (first["request_id"], first["job_id"], first["attempt"], first["worker"]) == (
        "req-1",
        "ftjob-abc",
        2,
        "host:1",
    )
    assert first["step"] == 3 and first["loss"] == 0.5 and "obj" not in first  # only JSON-able extras
    assert second["level"] == "ERROR" and "ValueError: bad thing" in second["exc"] and "Traceback" in second["exc"]
    assert third["message"] == "outside"
    assert not {"request_id", "job_id", "attempt", "worker", "exc"} & set(third)


def test_explicit_extra_wins_over_bound_context() -> None:
    buf = io.StringIO()
    configure_logging("INFO", "json", stream=buf)
    with log_context(job_id="ftjob-bound"):
        log.info("x", extra={"job_id": "ftjob-explicit"})
    assert json.loads(buf.getvalue())["job_id"] == "ftjob-explicit"


def test_text_format_when_forced() -> None:
    buf = io.StringIO()
    configure_logging("INFO", "text", stream=buf)
    with log_context(job_id="ftjob-abc", attempt=1, request_id="req-9"):
        log.warning("lease lost")
    log.info("plain")
    first, second = _lines(buf)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} WARNING tests\.logs \[job=ftjob-abc attempt=1 req=req-9\] lease lost",
        first,
    ), first
    assert second.endswith("INFO    tests.logs plain")
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)


def test_auto_is_text_on_a_terminal_and_json_elsewhere() -> None:
    assert resolve_format("auto", io.StringIO()) == "json"
    leader, follower = os.openpty()
    with open(follower, "w") as tty:
        assert resolve_format("auto", tty) == "text"
        assert isinstance(make_handler("auto", tty).formatter, TextFormatter)
    os.close(leader)
    assert isinstance(make_handler("auto", io.StringIO()).formatter, JsonFormatter)
    assert resolve_format("text", io.StringIO()) == "text" and resolve_format("json") == "json"
    with pytest.raises(ValueError, match="unknown log format"):
        resolve_format("yaml")
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("LOUD", "json", stream=io.StringIO())


def test_configure_twice_replaces_its_handler_and_keeps_others() -> None:
    other = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", "json", stream=first)
    configure_logging("WARNING", "json", stream=second)
    log.warning("once")
    log.info("filtered")
    # billiard/multiprocessing switch propagation off on their logger: it writes through our handler itself.
    mp_logger = logging.getLogger("multiprocessing")
    mp_logger.propagate = False
    mp_logger.error("Process %r exited", "ForkPoolWorker-1")
    lines = [json.loads(line) for line in _lines(second)]
    assert first.getvalue() == ""
    assert [(e["logger"], e["message"]) for e in lines] == [
        ("tests.logs", "once"),
        ("multiprocessing", "Process 'ForkPoolWorker-1' exited"),
    ]
    assert other in logging.getLogger().handlers


def test_context_nests_resets_and_rejects_unknown_fields() -> None:
    with log_context(job_id="a", attempt=None):
        set_log_context(attempt=3)
        with log_context(job_id="b"):
            assert current_log_context() == {"job_id": "b", "attempt": 3}
        assert current_log_context() == {"job_id": "a", "attempt": 3}
    assert current_log_context() == {}
    with pytest.raises(TypeError, match="unknown log context fields"), log_context(user="x"):
        pass


def test_threads_keep_the_context_when_started_in_a_copy() -> None:
    buf = io.StringIO()
    configure_logging("INFO", "json", stream=buf)
    with log_context(job_id="ftjob-t", attempt=4):
        thread = threading.Thread(target=contextvars.copy_context().run, args=(log.info, "from a thread"))
        thread.start()
        thread.join()
    (line,) = _lines(buf)
    assert json.loads(line) | {"ts": None} == {
        "ts": None,
        "level": "INFO",
        "logger": "tests.logs",
        "message": "from a thread",
        "job_id": "ftjob-t",
        "attempt": 4,
    }


_DICT_CONFIG_SCRIPT = """
import io, logging, logging.config, warnings
from contracts.logs import log_context, logging_config

uvicorn_error = logging.getLogger("uvicorn.error")
uvicorn_error.addHandler(logging.StreamHandler(io.StringIO()))  # as uvicorn's default config would
uvicorn_error.propagate = False
logging.config.dictConfig(logging_config("info", "json"))
with log_context(request_id="req-u"):
    uvicorn_error.info("Started server process [%d]", 1, extra={"color_message": "\\x1b[36mStarted\\x1b[0m"})
    warnings.warn("careful", UserWarning, stacklevel=1)
"""


def test_dict_config_routes_uvicorn_and_warnings_through_our_formatter() -> None:
    # In a process of its own, as uvicorn applies log_config in each worker process: dictConfig closes every
    # handler in the process, pytest's own included (in this process that crashed the run: "lost sys.stderr").
    done = subprocess.run(
        [sys.executable, "-c", _DICT_CONFIG_SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [entry["logger"] for entry in lines] == ["uvicorn.error", "py.warnings"]
    assert all(entry["request_id"] == "req-u" for entry in lines)
    assert lines[0]["message"] == "Started server process [1]" and "color_message" not in lines[0]
    assert "careful" in lines[1]["message"]
