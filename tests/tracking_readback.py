"""Real experiment trackers for tests, and reading back what a job logged to them: an MLflow tracking server
(``mlflow server``, SQLite backend, local artifact store, loopback) and W&B offline run files (``.wandb``).

Shared by ``tests/training/test_trackers.py`` (the trainer in-process) and
``tests/e2e/test_trackers_end_to_end.py`` (the live stack)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ipo_cli.processes import free_port, stop_group, wait_http_ok


@contextmanager
def mlflow_server(root: Path, port: int | None = None) -> Iterator[str]:
    """Run ``mlflow server`` (SQLite backend and artifact store under ``root``) on ``127.0.0.1:port`` (a free
    port when None) until the block ends; yields its URL. Raises ``RuntimeError`` when it does not answer
    ``/health`` within 120 s (its log: ``root/server.log``)."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with (root / "server.log").open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                str(root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        try:
            wait_http_ok(f"{url}/health", [proc], timeout=120)
            yield url
        finally:
            stop_group(proc)


def mlflow_history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every ``(step, value)`` of metric ``key`` in the run, sorted by step (duplicates kept)."""
    return sorted((int(m.step), float(m.value)) for m in client.get_metric_history(run_id, key))


# ---- W&B offline runs ----

WANDB_BLOCK = 32768
"""A ``.wandb`` file is a LevelDB-style log (W&B's ``core/pkg/leveldb``): a 7-byte header (``:W&B``, magic
0xBEE1, version), then 32 KiB blocks of records, each ``crc32 (4) | length (2) | type (1) | payload``;
types 1 full, 2 first, 3 middle, 4 last chunk of a record; a block's tail under 7 bytes is padding."""


def read_wandb(path: Path, timeout: float = 120) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """History rows, the final config and the run record (``run_id``, ``display_name``, ``tags``, ``exited``)
    of an offline W&B run file, once its exit record is there (wandb-core, its own process, may still be
    writing the last records when ``finish()`` returns); as it is after ``timeout`` seconds otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        history, config, run = _read_wandb_once(path)
        if run.get("exited") or time.monotonic() > deadline:
            return history, config, run
        time.sleep(0.5)


def _read_wandb_once(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    from wandb.proto import wandb_internal_pb2

    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    run: dict[str, Any] = {}
    for data in _wandb_records(path):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            config.update({_key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            run = {"run_id": record.run.run_id, "display_name": record.run.display_name, "tags": list(record.run.tags)}
            config.update({_key(item): json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "exit":
            run["exited"] = True
            run["exit_code"] = record.exit.exit_code
    return history, config, run


def _key(item: Any) -> str:
    return str(item.key or "/".join(item.nested_key))


def _wandb_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero fill at the end of a block or the file
            pos += WANDB_BLOCK - pos % WANDB_BLOCK if pos % WANDB_BLOCK else 0
            continue
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload
