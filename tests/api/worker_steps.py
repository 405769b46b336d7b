"""Drive a job through the worker protocol (``/internal/v1``) from a test, as a worker would.

Works with a ``TestClient`` or an ``httpx.Client`` pointed at a live server (the same calls on both).
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi.testclient import TestClient

Client = httpx.Client | TestClient
"""Either client: starlette's ``TestClient`` is an ``httpx2.Client``, not an ``httpx.Client``."""


def _ok(r: Any) -> dict[str, Any]:  # an httpx or httpx2 Response
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def claim(client: Client, worker: dict[str, str], job_id: str) -> str:
    """queued -> running; returns the lease token."""
    r = client.post(f"/internal/v1/jobs/{job_id}/claim", headers=worker, json={"worker_id": "test-worker"})
    return str(_ok(r)["lease_token"])


def add_checkpoint(client: Client, worker: dict[str, str], job_id: str, token: str, step: int) -> str:
    r = client.post(
        f"/internal/v1/jobs/{job_id}/checkpoints",
        headers=worker,
        data={"lease_token": token, "step": str(step), "metrics": '{"train_loss": 0.5}'},
        files={"file": (f"ckpt-{step}.zip", b"PK-not-really-a-zip")},
    )
    return str(_ok(r)["id"])


def succeed(client: Client, worker: dict[str, str], job_id: str) -> dict[str, Any]:
    """queued -> running -> succeeded, with an adapter artifact; returns the finish answer."""
    token = claim(client, worker, job_id)
    add_checkpoint(client, worker, job_id, token, 1)
    r = client.post(
        f"/internal/v1/jobs/{job_id}/artifacts",
        headers=worker,
        data={"lease_token": token, "name": "adapter"},
        files={"file": ("adapter.zip", b"adapter-bytes")},
    )
    adapter = _ok(r)["file_id"]
    r = client.post(
        f"/internal/v1/jobs/{job_id}/finish",
        headers=worker,
        json={"lease_token": token, "adapter_file_id": adapter, "trained_tokens": 123},
    )
    return _ok(r)


def stopped(client: Client, worker: dict[str, str], job_id: str, token: str) -> None:
    """The worker saw the pause and stopped: the job becomes resumable."""
    r = client.post(
        f"/internal/v1/jobs/{job_id}/stopped", headers=worker, json={"lease_token": token, "reason": "paused"}
    )
    _ok(r)
