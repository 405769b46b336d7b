"""Broker layout both sides must agree on (the API sends, the worker consumes).

For the embedded default (``filesystem://``), kombu's filesystem transport reads and writes one queue
folder; producer and consumer must be given exactly the same folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FILESYSTEM_BROKER = "filesystem://"


def filesystem_transport_options(broker_dir: Path, *, create: bool = True) -> dict[str, Any]:
    """kombu filesystem transport: one queue folder (in == out); ``create=False`` defers mkdir."""
    broker_dir = broker_dir.resolve()
    queue_dir = broker_dir / "queue"
    processed_dir = broker_dir / "processed"
    control_dir = broker_dir / "control"
    if create:
        for folder in (queue_dir, processed_dir, control_dir):
            folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "processed_folder": str(processed_dir),
        "store_processed": False,
        "control_folder": str(control_dir),
    }
