"""Runs one attempt's trainer child and relays what it reports to the API.

Four threads: the caller's (reads reports off a queue, uploads checkpoints and artifacts, then reports
the outcome), a pipe reader (report lines -> queue, so the child never blocks on a slow upload), a
control thread (heartbeats, event flushing) and a request watcher (holds ``GET .../control`` open, so a
cancel or pause reaches the trainer within about a second rather than at the next heartbeat). Stop
requests (cancel/pause from the watcher or a heartbeat, worker shutdown, lost lease) signal the child
once and arm a timer that SIGKILLs its whole process group after ``stop_grace_seconds``; the group is
killed in any case before :meth:`Supervisor.run` returns.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from contracts.internal import (
    ClaimResponse,
    FailRequest,
    FinishRequest,
    HeartbeatRequest,
    Progress,
    StoppedRequest,
    TrainerReport,
)
from worker.api_client import (
    ApiClient,
    ApiError,
    ApiUnavailable,
    EventBuffer,
    LeaseLost,
    NotFound,
)
from worker.archive import zip_dir
from worker.training.request import EXIT_OK, EXIT_STOPPED

log = logging.getLogger(__name__)

DEFAULT_TRAINER = (sys.executable, "-m", "worker.training.run")
_EOF = object()
StopReason = Literal["paused", "cancelled", "shutdown"]
OutcomeStatus = Literal["succeeded", "stopped", "failed", "lease_lost", "unreported"]
# Which signal asks the trainer to stop for each reason (worker/training/request.py).
_STOP_SIGNALS: dict[StopReason, signal.Signals] = {
    "cancelled": signal.SIGTERM,
    "paused": signal.SIGUSR1,
    "shutdown": signal.SIGUSR1,
}
_STOP_PRIORITY: dict[StopReason, int] = {"shutdown": 0, "paused": 1, "cancelled": 2}
_ACTION_REASONS: dict[str, StopReason] = {"cancel": "cancelled", "pause": "paused"}
CONTROL_WAIT_SECONDS = 20.0
"""How long one ``GET .../control`` is held open by the API (the watcher then asks again)."""
_LEASED_STATUSES = frozenset({"running", "paused", "cancelled"})


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as reported to the API (``unreported``: the API could not be reached)."""

    status: OutcomeStatus
    returncode: int | None
    reason: str | None = None
    """The stop reason (stopped) or the error code (failed)."""
    message: str | None = None


def metrics_message(data: Mapping[str, Any], step: int | None) -> str:
    """``Step 10/50: training loss=0.9100, validation loss=0.9500``, from whatever keys are there."""
    step = step if step is not None else data.get("step")
    total = data.get("total_steps")
    head = f"Step {step}/{total}" if total else f"Step {step}"
    parts = []
    for key, label in (("train_loss", "training loss"), ("valid_loss", "validation loss")):
        value = data.get(key)
        if isinstance(value, int | float):
            parts.append(f"{label}={value:.4f}")
    return head + (": " + ", ".join(parts) if parts else "")


class Supervisor:
    def __init__(
        self,
        api: ApiClient,
        claim: ClaimResponse,
        request_path: Path,
        attempt_dir: Path,
        *,
        heartbeat_seconds: float | None = None,
        stop_grace_seconds: float = 60.0,
        trainer_argv: Sequence[str] = DEFAULT_TRAINER,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.api = api
        self.claim = claim
        self.job_id = claim.job_id
        self.lease_token = claim.lease_token
        self.request_path = Path(request_path)
        self.attempt_dir = Path(attempt_dir)
        self.heartbeat_seconds = float(heartbeat_seconds or claim.heartbeat_seconds)
        self.stop_grace_seconds = stop_grace_seconds
        self.trainer_argv = list(trainer_argv)
        self.env = dict(env) if env is not None else None
        self.events = EventBuffer(api, self.job_id, self.lease_token)

        self._reports: queue.Queue[object] = queue.Queue()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop_reason: StopReason | None = None
        self._shutdown_requested = threading.Event()
        self._lease_lost = threading.Event()
        self._done_running = threading.Event()
        self._kill_timer: threading.Timer | None = None
        self._heartbeat_due = 0.0
        self._progress = Progress()
        self._resolved: dict[str, Any] | None = None
        self._done: TrainerReport | None = None
        self._error: TrainerReport | None = None
        self._upload_failed = False
        self._refused_as_stopped = False
        """An upload was refused because the job is no longer running (cancelled or paused meanwhile)."""
        self.file_ids: dict[str, str] = {}
        self.checkpoint_ids: dict[int, str] = {}

    # ---- requests from outside (any thread, or a signal handler) ----

    def shutdown(self) -> None:
        """Worker is going away: the trainer saves a checkpoint and the job is reported ``stopped``.

        Only sets a flag (safe inside a signal handler); the control thread does the signalling.
        """
        self._shutdown_requested.set()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ---- stopping the child ----

    def _request_stop(self, reason: StopReason, source: str) -> None:
        with self._lock:
            current = self._stop_reason
            if current is not None and _STOP_PRIORITY[current] >= _STOP_PRIORITY[reason]:
                return
            self._stop_reason = reason
            sig = _STOP_SIGNALS[reason]
            if current is not None and _STOP_SIGNALS[current] == sig:
                return  # pause after shutdown: already asked to checkpoint and exit
            log.info("job %s: asking trainer to stop (%s, %s; from %s)", self.job_id, reason, sig.name, source)
            self._signal_child(sig)
            self._arm_kill_timer()

    def _on_lease_lost(self, exc: LeaseLost) -> None:
        if self._lease_lost.is_set():
            return
        log.warning("job %s: lease lost (%s); stopping the trainer, writing nothing more", self.job_id, exc)
        self._lease_lost.set()
        self.events.discard()
        with self._lock:
            self._signal_child(signal.SIGTERM)
            self._arm_kill_timer()

    def _signal_child(self, sig: signal.Signals) -> None:
        # Graceful signals go to the trainer only: its helpers (dataloader workers) would die of SIGUSR1.
        # The child is reaped only after the control thread stops, so its pid cannot have been reused.
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    def _arm_kill_timer(self) -> None:
        if self._kill_timer is None:
            self._kill_timer = threading.Timer(self.stop_grace_seconds, self._kill_group)
            self._kill_timer.daemon = True
            self._kill_timer.start()

    def _kill_group(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the child's pid

    # ---- threads ----

    def _read_reports(self, fd: int) -> None:
        with open(fd, "rb", buffering=0, closefd=True) as pipe:
            buffered = b""
            while chunk := pipe.read(65536):
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    self._parse(line)
            self._parse(buffered)
        self._reports.put(_EOF)

    def _parse(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            self._reports.put(TrainerReport.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as exc:
            log.warning("job %s: ignoring malformed report line %r: %s", self.job_id, line[:200], exc)

    def _control(self) -> None:
        next_flush = 0.0
        flush_failures = 0
        self._heartbeat_due = time.monotonic() + self.heartbeat_seconds
        while not self._done_running.wait(0.2):
            if self._lease_lost.is_set():
                return
            if self._shutdown_requested.is_set():
                self._request_stop("shutdown", "the worker's shutdown")
            now = time.monotonic()
            try:
                if now >= self._heartbeat_due:
                    self._heartbeat()
                    self._heartbeat_due = time.monotonic() + self.heartbeat_seconds
                if now >= next_flush and self.events.pending:
                    if self.events.flush(retry_seconds=2.0):
                        flush_failures = 0
                    else:
                        flush_failures += 1
                        next_flush = time.monotonic() + min(30.0, 0.5 * 2**flush_failures)
            except LeaseLost as exc:
                self._on_lease_lost(exc)
                return
            except Exception:  # keep heartbeating whatever one call did
                log.exception("job %s: control loop error", self.job_id)

    def _heartbeat(self) -> None:
        with self._lock:
            body = HeartbeatRequest(
                lease_token=self.lease_token,
                progress=self._progress.model_copy(),
                resolved_hyperparameters=self._resolved,
            )
        try:
            response = self.api.heartbeat(self.job_id, body, retry_seconds=max(1.0, self.heartbeat_seconds / 2))
        except ApiUnavailable as exc:
            log.warning("job %s: heartbeat not delivered: %s", self.job_id, exc)
            return
        self._apply_action(response.action, "a heartbeat")

    def _apply_action(self, action: str, source: str) -> None:
        if (reason := _ACTION_REASONS.get(action)) is not None:
            if source != "a heartbeat":  # heartbeats repeat it every interval; the others say it once
                log.info("job %s: %s asks to %s", self.job_id, source, action)
            self._request_stop(reason, source)

    def _watch_requests(self) -> None:
        """Long-polls ``GET .../control`` until the attempt ends, acting on each change of the job's status.

        Stops watching (heartbeats still carry the action) when the API has no such endpoint or the job
        left the leased states; an unreachable API is asked again after a backoff of 1 to 30 s.
        """
        known: str | None = "running"
        failures = 0
        while not self._done_running.is_set() and not self._lease_lost.is_set():
            try:
                answer = self.api.control(self.job_id, known, wait_seconds=CONTROL_WAIT_SECONDS, retry_seconds=0)
            except NotFound:
                log.info("job %s: the API has no control endpoint; stop requests come with heartbeats", self.job_id)
                return
            except Exception as exc:  # unreachable, or the client was closed as the attempt ended
                failures += 1
                log.debug("job %s: control request failed: %s", self.job_id, exc)
                self._done_running.wait(min(30.0, 2.0 ** (failures - 1)))
                continue
            failures = 0
            self._apply_action(answer.action, "the control request")  # a no-op once the trainer exited
            if answer.status not in _LEASED_STATUSES:
                return  # requeued or ended: the heartbeat reports the lost lease
            known = answer.status

    # ---- reports ----

    def _handle(self, report: TrainerReport) -> None:
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
            self._heartbeat_due = 0.0  # show the resolved hyperparameters now, not in 30 s
        elif report.kind in ("checkpoint", "artifact"):
            if not self._lease_lost.is_set():
                try:
                    self._upload(report)
                except LeaseLost as exc:
                    if exc.code == "invalid_state":  # cancelled/paused meanwhile: still our lease, just refused
                        log.info("job %s: %s not recorded: %s", self.job_id, report.kind, exc.message)
                        self._refused_as_stopped = True
                        self._learn_stop_reason()
                    else:
                        self._on_lease_lost(exc)
        elif report.kind == "done":
            self._done = report
        elif report.kind == "error":
            self._error = report

    def _learn_stop_reason(self) -> None:
        """Ask the API at once why it refused an upload (the watcher may not have answered yet)."""
        try:
            answer = self.api.control(self.job_id, None, wait_seconds=0, retry_seconds=5)
            self._apply_action(answer.action, "an upload's refusal")
        except (ApiError, ApiUnavailable) as exc:
            log.info("job %s: could not read the job's requested action: %s", self.job_id, exc)

    def _upload(self, report: TrainerReport) -> None:
        if not report.path:
            log.warning("job %s: %s report without a path", self.job_id, report.kind)
            return
        path = Path(report.path)
        uploads = self.attempt_dir / "uploads"
        if report.kind == "checkpoint":
            step = report.step if report.step is not None else int((report.data or {}).get("step", 0))
            archive = zip_dir(path, uploads / f"checkpoint-step-{step}.zip")
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
                archive = zip_dir(path, uploads / f"{self.job_id}-{name}.zip")
                try:
                    self.file_ids[name] = self.api.upload_artifact(self.job_id, self.lease_token, name, archive)
                finally:
                    archive.unlink(missing_ok=True)
            else:
                self.file_ids[name] = self.api.upload_artifact(self.job_id, self.lease_token, name, path)
        except (ApiUnavailable, ApiError, OSError):
            self._upload_failed = True
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

    # ---- main ----

    def run(self) -> Outcome:
        """Start the trainer, relay until it exits, report the outcome. Never leaves a process behind."""
        read_fd, write_fd = os.pipe()
        argv = [*self.trainer_argv, str(self.request_path), "--report-fd", str(write_fd)]
        self.attempt_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.attempt_dir / "trainer.log"
        try:
            with open(log_path, "ab") as trainer_log:
                self._proc = subprocess.Popen(
                    argv,
                    start_new_session=True,  # own process group: one killpg reaches every helper it forks
                    pass_fds=(write_fd,),
                    stdin=subprocess.DEVNULL,
                    stdout=trainer_log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        proc = self._proc
        log.info("job %s attempt %d: trainer pid %d", self.job_id, self.claim.attempt, proc.pid)
        # Each thread runs in a copy of this context, so its log lines keep the job id and attempt.
        reader = threading.Thread(
            target=contextvars.copy_context().run, args=(self._read_reports, read_fd), name="report-reader", daemon=True
        )
        control = threading.Thread(
            target=contextvars.copy_context().run, args=(self._control,), name="heartbeat", daemon=True
        )
        # Not joined: its request may be held open by the API for CONTROL_WAIT_SECONDS; it acts on
        # nothing once the attempt is over and ends when that request returns or the client is closed.
        watcher = threading.Thread(
            target=contextvars.copy_context().run, args=(self._watch_requests,), name="control-watch", daemon=True
        )
        reader.start()
        control.start()
        watcher.start()
        try:
            self._relay_until_exit(proc)
        finally:
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            self._kill_group()  # helpers the trainer left behind; the zombie keeps the group id ours
            self._done_running.set()
            control.join()
            proc.wait()
            reader.join(timeout=5)
        returncode = proc.returncode
        with self._lock:
            reason = self._stop_reason
        return self._report_outcome(returncode, reason, log_path)

    def _decide(self, rc: int, reason: StopReason | None, log_path: Path) -> Outcome:
        done, error = self._done, self._error
        if rc == EXIT_OK and done is not None:
            if "adapter" in self.file_ids:
                return Outcome("succeeded", rc)
            if reason is not None or self._refused_as_stopped:
                # Trained to the end before the stop arrived; the API refused the adapter because the job
                # is cancelled or paused. Stopped on purpose: no "could not be uploaded" warning.
                return Outcome("stopped", rc, reason or "cancelled")
            if self._upload_failed:
                return Outcome("failed", rc, "upload_failed", "The trained adapter could not be uploaded.")
            return Outcome("failed", rc, "trainer_protocol_error", "The trainer reported no adapter.")
        if reason == "cancelled" or rc == EXIT_STOPPED or (reason is not None and error is None):
            # Killed after the grace period still counts as stopped: the last complete checkpoint stands.
            return Outcome("stopped", rc, reason or "shutdown")
        if error is not None:
            return Outcome("failed", rc, error.code or "training_error", error.message or "Training failed.")
        if rc < 0:
            message = f"The trainer process died from signal {signal.Signals(-rc).name}."
            return Outcome("failed", rc, "trainer_killed", message + _log_tail(log_path))
        return Outcome("failed", rc, "trainer_crashed", f"The trainer exited with status {rc}." + _log_tail(log_path))

    def _report_outcome(self, rc: int, reason: StopReason | None, log_path: Path) -> Outcome:
        if self._lease_lost.is_set():
            return Outcome("lease_lost", rc)
        outcome = self._decide(rc, reason, log_path)
        lease = self.lease_token
        try:
            if not self.events.flush():
                log.warning("job %s: %d events could not be delivered", self.job_id, self.events.pending)
            if outcome.status == "succeeded":
                trained_tokens = (self._done.data or {}).get("trained_tokens") if self._done else None
                self.api.finish(
                    self.job_id,
                    FinishRequest(
                        lease_token=lease,
                        trained_tokens=trained_tokens if isinstance(trained_tokens, int) else None,
                        adapter_file_id=self.file_ids["adapter"],
                        result_file_ids=[self.file_ids[n] for n in ("metrics", "samples") if n in self.file_ids],
                    ),
                )
            elif outcome.status == "stopped":
                stop_reason: StopReason = outcome.reason  # type: ignore[assignment]
                self.api.stopped(self.job_id, StoppedRequest(lease_token=lease, reason=stop_reason))
            else:
                # A reported error code (bad data, OOM, NaN, config) will fail again; a crash may not.
                retryable = self._error is None or outcome.reason == "upload_failed"
                message = (outcome.message or "")[:4000]
                code = (outcome.reason or "training_error")[:100]
                self.api.fail(
                    self.job_id, FailRequest(lease_token=lease, code=code, message=message, retryable=retryable)
                )
        except LeaseLost:
            return Outcome("lease_lost", rc, outcome.reason, outcome.message)
        except ApiUnavailable as exc:
            log.error("job %s: outcome %s not reported: %s", self.job_id, outcome.status, exc)
            return Outcome("unreported", rc, outcome.reason, outcome.message)
        log.info("job %s attempt %d: %s (%s)", self.job_id, self.claim.attempt, outcome.status, outcome.reason)
        return outcome

    def _relay_until_exit(self, proc: subprocess.Popen[bytes]) -> None:
        eof = False
        exited_at: float | None = None
        while True:
            try:
                item = self._reports.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is _EOF:
                eof = True
            elif isinstance(item, TrainerReport):
                try:
                    self._handle(item)
                except (ApiError, ApiUnavailable, OSError) as exc:
                    log.error("job %s: could not relay %s report: %s", self.job_id, item.kind, exc)
            if exited_at is None and _has_exited(proc.pid):
                exited_at = time.monotonic()
                self._kill_group()  # so helpers holding the report pipe let the reader see EOF
            if exited_at is not None and (eof or time.monotonic() - exited_at > 10):
                return


def _log_tail(path: Path, max_chars: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_chars))
            tail = f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f" Last output:\n{tail}" if tail else ""


def _has_exited(pid: int) -> bool:
    """Whether the child exited, without reaping it (WNOWAIT keeps its pid, hence its group id, ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
