"""Fetching a job's results through the public API: the adapter, or one checkpoint, unpacked.

Used by ``ipo jobs download`` (``client_commands``) and by ``ipo demo``; its own module so that neither
of those imports the other.
"""

from __future__ import annotations

from pathlib import Path

from ipo_cli.errors import CliError
from ipo_cli.http import ApiClient


def download_adapter(client: ApiClient, job_id: str, out: Path) -> Path:
    """Unpack a succeeded job's adapter (its first result file) into ``out``; returns ``out``.

    Raises ``CliError`` when the job has no adapter (not succeeded); the zip is unpacked zip-slip-safe.
    """
    job = client.json("GET", f"/v1/fine_tuning/jobs/{job_id}")
    if job["status"] != "succeeded" or not job["result_files"]:
        raise CliError(f"job {job_id} has no adapter (status {job['status']})")
    archive = client.download(job["result_files"][0], out.with_suffix(".zip"))
    from worker.archive import unzip_safe  # the same zip-slip-safe unpacking the worker uses

    unzip_safe(archive, out)
    return out


def download_checkpoint(client: ApiClient, job_id: str, wanted: str, out: Path) -> Path:
    """Unpack one checkpoint (adapter + optimizer state); returns the directory holding its adapter."""
    after: str | None = None
    while True:
        page = client.json(
            "GET",
            f"/v1/fine_tuning/jobs/{job_id}/checkpoints",
            params={"limit": 100, **({"after": after} if after else {})},
        )
        match = [c for c in page["data"] if wanted in (c["id"], str(c["step_number"]))]
        if match or not page["has_more"]:
            break
        after = page["last_id"]
    if not match:
        raise CliError(f"job {job_id} has no checkpoint {wanted!r} (see ipo jobs get / the dashboard)")
    archive = client.download(match[0]["file_id"], out.with_suffix(".zip"))
    from worker.archive import unzip_safe

    unzip_safe(archive, out)
    found = sorted(p.parent for p in out.rglob("adapter_config.json"))
    if not found:
        raise CliError(f"checkpoint {wanted} holds no adapter_config.json")
    return found[0]
