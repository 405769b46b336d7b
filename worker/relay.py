"""Relays one attempt's trainer reports to the API: events and metrics (buffered), checkpoint and
artifact uploads, and the progress a heartbeat carries.

Runs in the supervisor's main thread (``handle``); the heartbeat thread reads ``heartbeat_body``. What
it learns for the outcome (``done``/``error`` reports, which uploads went through or were refused) is
left on its attributes for ``worker.outcome.decide``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from contracts.internal import HeartbeatRequest, Progress, TrainerReport
from worker.api_client import ApiClient, ApiError, ApiUnavailable, LeaseLost
from worker.archive import zip_dir
from worker.event_buffer import EventBuffer

log = logging.getLogger(__name__)


METRICS_IN_MESSAGE = (
    ("train_loss", "training loss", "{:.4f}"),
    ("valid_loss", "validation loss", "{:.4f}"),
    ("valid_preference_accuracy", "validation preference accuracy", "{:.2f}"),
    ("valid_token_accuracy", "validation token accuracy", "{:.2f}"),
    ("samples/changed_fraction", "greedy samples differing from the reference", "{:.0%}"),
)
"""The metrics a ``Step N/M`` event's message names, when present (label, format); all are in its data."""


def metrics_message(data: Mapping[str, Any], step: int | None) -> str:
    """``Step 10/50: training loss=0.9100, validation loss=0.9500``, from whichever of
    ``METRICS_IN_MESSAGE`` are there (a samples evaluation reads ``Step 10/50: greedy samples differing from
    the reference=25%``), so no step event is a bare ``Step N/M``."""
    step = step if step is not None else data.get("step")
    total = data.get("total_steps")
    head = f"Step {step}/{total}" if total else f"Step {step}"
    parts = []
    for key, label, fmt in METRICS_IN_MESSAGE:
        value = data.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{label}={fmt.format(value)}")
    return head + (": " + ", ".join(parts) if parts else "")


class Relay:
    """What one attempt's reports become on the API side.

    ``lease_lost`` is shared with the supervisor: once set, nothing more is uploaded. ``on_lease_lost``
    is called when an upload finds the lease gone; ``on_refused_as_stopped`` when the API refuses an
    upload because the job is no longer running (cancelled or paused while the trainer finished).
    """

    def __init__(
        self,
        api: ApiClient,
        job_id: str,
        lease_token: str,
        uploads_dir: Path,
        *,
        lease_lost: threading.Event,
        on_lease_lost: Callable[[LeaseLost], None],
        on_refused_as_stopped: Callable[[], None],
    ) -> None:
        self.api = api
        self.job_id = job_id
        self.lease_token = lease_token
        self.uploads_dir = Path(uploads_dir)
        self.events = EventBuffer(api, job_id, lease_token)
        self.lease_lost = lease_lost
        self._on_lease_lost = on_lease_lost
        self._on_refused_as_stopped = on_refused_as_stopped
        self._lock = threading.Lock()
        self._progress = Progress()
        self._resolved: dict[str, Any] | None = None
        self.heartbeat_wanted = threading.Event()
        """Set when a heartbeat should go out now (the resolved hyperparameters arrived)."""
        self.done: TrainerReport | None = None
        self.error: TrainerReport | None = None
        self.upload_failed = False
        self.refused_as_stopped = False
        self.file_ids: dict[str, str] = {}
        """Uploaded artifacts by name (``adapter``, ``metrics``, ``samples``) -> API file id."""
        self.checkpoint_ids: dict[int, str] = {}
        """Uploaded checkpoints by step -> API checkpoint id."""

    def heartbeat_body(self) -> HeartbeatRequest:
        with self._lock:
            return HeartbeatRequest(
                lease_token=self.lease_token,
                progress=self._progress.model_copy(),
                resolved_hyperparameters=self._resolved,
            )

    def handle(self, report: TrainerReport) -> None:
        """Relay one report. Raises ``ApiError``/``ApiUnavailable``/``OSError`` when an upload failed."""
        created = report.time
        if report.kind == "event":
            self.events.add(report.message or "", level=report.level, data=report.data, created_at=created)
        elif report.kind == "metrics":
            data = dict(report.data or {})
            step = report.step if report.step is not None else data.get("step")
            if step is not None:
                data.setdefault("step", step)
            self._update_progress(data, step)
            message = report.message or metrics_message(data, step)
            self.events.add(message, type_="metrics", level=report.level, data=data, created_at=created)
        elif report.kind == "resolved":
            with self._lock:
                self._resolved = dict(report.data or {})
            self.heartbeat_wanted.set()  # show the resolved hyperparameters now, not in 30 s
        elif report.kind in ("checkpoint", "artifact"):
            if not self.lease_lost.is_set():
                try:
                    self._upload(report)
                except LeaseLost as exc:
                    if exc.code == "invalid_state":  # cancelled/paused meanwhile: still our lease, just refused
                        log.info("job %s: %s not recorded: %s", self.job_id, report.kind, exc.message)
                        self.refused_as_stopped = True
                        self._on_refused_as_stopped()
                    else:
                        self._on_lease_lost(exc)
        elif report.kind == "done":
            self.done = report
        elif report.kind == "error":
            self.error = report

    def _upload(self, report: TrainerReport) -> None:
        if not report.path:
            log.warning("job %s: %s report without a path", self.job_id, report.kind)
            return
        # The events reported before this upload go first, so the job's event list reads in step order
        # ("Step 10/10: ..." before "Checkpoint saved at step 10"). Best effort: if the API is unreachable
        # they stay buffered (2 s, the supervisor's own flush budget) and the upload below retries on its own.
        self.events.flush(retry_seconds=2.0)
        path = Path(report.path)
        if report.kind == "checkpoint":
            step = report.step if report.step is not None else int((report.data or {}).get("step", 0))
            archive = zip_dir(path, self.uploads_dir / f"checkpoint-step-{step}.zip")
            try:
                self.checkpoint_ids[step] = self.api.upload_checkpoint(
                    self.job_id, self.lease_token, step, report.data, archive
                )
            except ApiUnavailable:
                # Only costs resumability: a later checkpoint (or a restart from an earlier one) still works.
                self.events.add(f"Checkpoint at step {step} could not be uploaded", level="warn")
                raise
            finally:
                archive.unlink(missing_ok=True)
            return
        name: Literal["adapter", "metrics", "samples"]
        if report.name == "adapter":
            name = "adapter"
        elif report.name == "metrics":
            name = "metrics"
        elif report.name == "samples":
            name = "samples"
        else:
            log.warning("job %s: ignoring artifact %r", self.job_id, report.name)
            return
        try:
            if path.is_dir():
                archive = zip_dir(path, self.uploads_dir / f"{self.job_id}-{name}.zip")
                try:
                    self.file_ids[name] = self.api.upload_artifact(self.job_id, self.lease_token, name, archive)
                finally:
                    archive.unlink(missing_ok=True)
            else:
                self.file_ids[name] = self.api.upload_artifact(self.job_id, self.lease_token, name, path)
        except (ApiUnavailable, ApiError, OSError):
            self.upload_failed = True
            raise

    def _update_progress(self, data: Mapping[str, Any], step: Any) -> None:
        def as_int(value: Any) -> int | None:
            return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

        with self._lock:
            progress = self._progress
            progress.step = as_int(step) if as_int(step) is not None else progress.step
            progress.total_steps = as_int(data.get("total_steps")) or progress.total_steps
            progress.trained_tokens = as_int(data.get("trained_tokens")) or progress.trained_tokens
            eta = as_int(data.get("eta_seconds"))
            if eta is not None:
                progress.estimated_finish = int(time.time()) + eta
