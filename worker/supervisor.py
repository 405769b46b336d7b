"""Runs one attempt: its trainer child, the relay of its reports, stop requests, and the outcome.

The parts live in their own modules: ``worker.trainer_process`` (spawn, signals, kill timer, pipe
reader), ``worker.relay`` (events, metrics, uploads) and ``worker.outcome`` (the pure decision of how
the attempt ended). This module wires them together with three threads of its own: the caller's
(relays reports until the trainer exits, then reports the outcome), a control thread (heartbeats, event
flushing) and a request watcher (holds ``GET .../control`` open, so a cancel or pause reaches the
trainer within about a second rather than at the next heartbeat).

Stop requests (cancel/pause from the watcher or a heartbeat, worker shutdown, lost lease) signal the
child once and arm a timer that SIGKILLs its whole process group after ``stop_grace_seconds``; the group
is killed in any case before :meth:`Supervisor.run` returns.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from contracts.internal import (
    ClaimResponse,
    FailRequest,
    FinishRequest,
    StoppedRequest,
    StopReason,
    TrainerReport,
)
from worker.api_client import ApiClient, ApiError, ApiUnavailable, LeaseLost, NotFound
from worker.event_buffer import EventBuffer
from worker.outcome import AttemptFacts, Outcome, decide, is_retryable
from worker.relay import Relay, metrics_message
from worker.trainer_process import DEFAULT_TRAINER, EOF, TrainerProcess

__all__ = ["DEFAULT_TRAINER", "Outcome", "Supervisor", "metrics_message"]

log = logging.getLogger(__name__)

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


class Supervisor:
    """One attempt of one claimed job: :meth:`run` starts the trainer and returns how the attempt ended."""

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
        n_processes: int = 1,
    ) -> None:
        self.api = api
        self.claim = claim
        self.job_id = claim.job_id
        self.lease_token = claim.lease_token
        self.attempt_dir = Path(attempt_dir)
        self.heartbeat_seconds = float(heartbeat_seconds or claim.heartbeat_seconds)
        self.trainer = TrainerProcess(
            trainer_argv,
            request_path,
            self.attempt_dir,
            stop_grace_seconds=stop_grace_seconds,
            env=env,
            label=self.job_id,
            n_processes=n_processes,
        )
        self._lease_lost = threading.Event()
        self.relay = Relay(
            api,
            self.job_id,
            self.lease_token,
            self.attempt_dir / "uploads",
            lease_lost=self._lease_lost,
            on_lease_lost=self._on_lease_lost,
            on_refused_as_stopped=self._learn_stop_reason,
        )
        self._lock = threading.Lock()
        self._stop_reason: StopReason | None = None
        self._shutdown_requested = threading.Event()
        self._done_running = threading.Event()

    @property
    def events(self) -> EventBuffer:
        return self.relay.events

    @property
    def file_ids(self) -> dict[str, str]:
        return self.relay.file_ids

    @property
    def checkpoint_ids(self) -> dict[int, str]:
        return self.relay.checkpoint_ids

    @property
    def pid(self) -> int | None:
        return self.trainer.pid

    # ---- requests from outside (any thread, or a signal handler) ----

    def shutdown(self) -> None:
        """Worker is going away: the trainer saves a checkpoint and the job is reported ``stopped``.

        Only sets a flag (safe inside a signal handler); the control thread does the signalling.
        """
        self._shutdown_requested.set()

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
            self.trainer.stop(sig)

    def _apply_action(self, action: str, source: str) -> None:
        if (reason := _ACTION_REASONS.get(action)) is not None:
            if source != "a heartbeat":  # heartbeats repeat it every interval; the others say it once
                log.info("job %s: %s asks to %s", self.job_id, source, action)
            self._request_stop(reason, source)

    def _on_lease_lost(self, exc: LeaseLost) -> None:
        if self._lease_lost.is_set():
            return
        log.warning("job %s: lease lost (%s); stopping the trainer, writing nothing more", self.job_id, exc)
        self._lease_lost.set()
        self.relay.events.discard()
        with self._lock:
            self.trainer.stop(signal.SIGTERM)

    def _learn_stop_reason(self) -> None:
        """Ask the API at once why it refused an upload (the watcher may not have answered yet)."""
        try:
            answer = self.api.control(self.job_id, None, wait_seconds=0, retry_seconds=5)
            self._apply_action(answer.action, "an upload's refusal")
        except (ApiError, ApiUnavailable) as exc:
            log.info("job %s: could not read the job's requested action: %s", self.job_id, exc)

    # ---- threads ----

    def _control(self) -> None:
        next_flush = 0.0
        flush_failures = 0
        heartbeat_due = time.monotonic() + self.heartbeat_seconds
        while not self._done_running.wait(0.2):
            if self._lease_lost.is_set():
                return
            if self._shutdown_requested.is_set():
                self._request_stop("shutdown", "the worker's shutdown")
            now = time.monotonic()
            try:
                if now >= heartbeat_due or self.relay.heartbeat_wanted.is_set():
                    self.relay.heartbeat_wanted.clear()
                    self._heartbeat()
                    heartbeat_due = time.monotonic() + self.heartbeat_seconds
                if now >= next_flush and self.relay.events.pending:
                    if self.relay.events.flush(retry_seconds=2.0):
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
        body = self.relay.heartbeat_body()
        try:
            response = self.api.heartbeat(self.job_id, body, retry_seconds=max(1.0, self.heartbeat_seconds / 2))
        except ApiUnavailable as exc:
            log.warning("job %s: heartbeat not delivered: %s", self.job_id, exc)
            return
        self._apply_action(response.action, "a heartbeat")

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

    # ---- main ----

    def run(self) -> Outcome:
        """Start the trainer, relay until it exits, report the outcome. Never leaves a process behind."""
        pid = self.trainer.start()
        log.info("job %s attempt %d: trainer pid %d", self.job_id, self.claim.attempt, pid)
        # Each thread runs in a copy of this context, so its log lines keep the job id and attempt.
        control = threading.Thread(
            target=contextvars.copy_context().run, args=(self._control,), name="heartbeat", daemon=True
        )
        # Not joined: its request may be held open by the API for CONTROL_WAIT_SECONDS; it acts on
        # nothing once the attempt is over and ends when that request returns or the client is closed.
        watcher = threading.Thread(
            target=contextvars.copy_context().run, args=(self._watch_requests,), name="control-watch", daemon=True
        )
        control.start()
        watcher.start()
        try:
            self._relay_until_exit()
        finally:
            self.trainer.kill_group()  # helpers the trainer left behind; the zombie keeps the group id ours
            self._done_running.set()
            control.join()
            returncode = self.trainer.wait()
        with self._lock:
            reason = self._stop_reason
        return self._report_outcome(self._facts(returncode, reason))

    def _facts(self, returncode: int, reason: StopReason | None) -> AttemptFacts:
        relay = self.relay
        return AttemptFacts(
            returncode=returncode,
            stop_reason=reason,
            done=relay.done,
            error=relay.error,
            adapter_uploaded="adapter" in relay.file_ids,
            upload_failed=relay.upload_failed,
            refused_as_stopped=relay.refused_as_stopped,
            log_tail=self.trainer.log_tail(),
            lost_ranks=tuple(self.trainer.lost_ranks()),
            n_processes=self.trainer.n_processes,
        )

    def _relay_until_exit(self) -> None:
        eof = False
        exited_at: float | None = None
        while True:
            try:
                item = self.trainer.reports.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is EOF:
                eof = True
            elif isinstance(item, TrainerReport):
                try:
                    self.relay.handle(item)
                except (ApiError, ApiUnavailable, OSError) as exc:
                    log.error("job %s: could not relay %s report: %s", self.job_id, item.kind, exc)
            if exited_at is None and self.trainer.has_exited():
                exited_at = time.monotonic()
                self.trainer.kill_group()  # so helpers holding the report pipe let the reader see EOF
            if exited_at is not None and (eof or time.monotonic() - exited_at > 10):
                return

    def _report_outcome(self, facts: AttemptFacts) -> Outcome:
        rc = facts.returncode
        if self._lease_lost.is_set():
            return Outcome("lease_lost", rc)
        outcome = decide(facts)
        lease = self.lease_token
        events = self.relay.events
        try:
            if not events.flush():
                log.warning("job %s: %d events could not be delivered", self.job_id, events.pending)
            if outcome.status == "succeeded":
                trained_tokens = (facts.done.data or {}).get("trained_tokens") if facts.done else None
                file_ids = self.relay.file_ids
                self.api.finish(
                    self.job_id,
                    FinishRequest(
                        lease_token=lease,
                        trained_tokens=trained_tokens if isinstance(trained_tokens, int) else None,
                        adapter_file_id=file_ids["adapter"],
                        result_file_ids=[file_ids[n] for n in ("metrics", "samples") if n in file_ids],
                    ),
                )
            elif outcome.status == "stopped":
                stop_reason: StopReason = outcome.reason  # type: ignore[assignment]
                self.api.stopped(self.job_id, StoppedRequest(lease_token=lease, reason=stop_reason))
            else:
                message = (outcome.message or "")[:4000]
                code = (outcome.reason or "training_error")[:100]
                retryable = is_retryable(outcome, facts)
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
