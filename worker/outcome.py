"""How an attempt ended: a pure decision from what happened (no process, no thread, no network).

The supervisor collects :class:`AttemptFacts` while it relays the trainer's reports, then asks
:func:`decide` which of ``succeeded`` / ``stopped`` / ``failed`` to report to the API. Unit-tested in
``tests/worker/test_outcome.py`` without any process.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Literal

from contracts.internal import StopReason, TrainerReport
from worker.training.request import EXIT_OK, EXIT_STOPPED

OutcomeStatus = Literal["succeeded", "stopped", "failed", "lease_lost", "unreported"]


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as reported to the API (``unreported``: the API could not be reached)."""

    status: OutcomeStatus
    returncode: int | None
    reason: str | None = None
    """The stop reason (stopped) or the error code (failed)."""
    message: str | None = None


@dataclass(frozen=True)
class AttemptFacts:
    """What the supervisor saw of one attempt, once its trainer has exited."""

    returncode: int
    """The trainer's exit status (negative: killed by that signal)."""
    stop_reason: StopReason | None = None
    """The strongest stop the supervisor asked for (``cancelled`` > ``paused`` > ``shutdown``), if any."""
    done: TrainerReport | None = None
    """The trainer's ``done`` report."""
    error: TrainerReport | None = None
    """The trainer's ``error`` report (its code and message name the failure)."""
    adapter_uploaded: bool = False
    upload_failed: bool = False
    """An artifact upload failed (API unreachable, refused, file unreadable)."""
    refused_as_stopped: bool = False
    """An upload was refused because the job is no longer running: the user cancelled or paused it."""
    log_tail: str = ""
    """The end of the trainer's output, appended to crash messages (`` Last output:\\n...`` or empty)."""
    lost_ranks: tuple[int, ...] = ()
    """Ranks of a run on several devices that died without recording an exit (killed, crashed; see
    ``worker/training/distributed.py``). Empty for a single-process trainer."""
    n_processes: int = 1


def decide(facts: AttemptFacts) -> Outcome:
    """The outcome to report for ``facts``:

    - ``succeeded`` when the trainer exited 0 after ``done`` and the adapter was uploaded;
    - ``stopped`` (with the stop reason) when a stop was asked for or the trainer exited
      ``EXIT_STOPPED``, including a trainer killed after the grace period (its last complete checkpoint
      stands) and one that finished while the job was being cancelled or paused (no upload warning);
    - ``failed`` otherwise: a rank of a run on several devices that died without a word (``rank_died``,
      retryable, ahead of rank 0's error, which it caused), the trainer's reported error, an adapter that
      could not be uploaded, a protocol error (exit 0 without an adapter), a crash (exit status) or a kill
      (signal).
    """
    rc, reason, error = facts.returncode, facts.stop_reason, facts.error
    if rc == EXIT_OK and facts.done is not None:
        if facts.adapter_uploaded:
            return Outcome("succeeded", rc)
        if reason is not None or facts.refused_as_stopped:
            # Trained to the end before the stop arrived; the API refused the adapter because the job
            # is cancelled or paused. Stopped on purpose: no "could not be uploaded" warning.
            return Outcome("stopped", rc, reason or "cancelled")
        if facts.upload_failed:
            return Outcome("failed", rc, "upload_failed", "The trained adapter could not be uploaded.")
        return Outcome("failed", rc, "trainer_protocol_error", "The trainer reported no adapter.")
    if reason == "cancelled" or rc == EXIT_STOPPED or (reason is not None and error is None):
        # Killed after the grace period still counts as stopped: the last complete checkpoint stands.
        return Outcome("stopped", rc, reason or "shutdown")
    if facts.lost_ranks and rc != EXIT_OK:
        # A rank killed or crashed under it; rank 0's own error, if any, is the consequence (a collective
        # that lost its peer). The attempt may succeed again from the last checkpoint.
        lost = ", ".join(str(r) for r in facts.lost_ranks)
        message = (
            f"Rank {lost} of {facts.n_processes} training processes died without reporting (killed or crashed); "
            "the other ranks were stopped. A new attempt resumes from the last checkpoint."
        )
        return Outcome("failed", rc, "rank_died", message + facts.log_tail)
    if error is not None:
        return Outcome("failed", rc, error.code or "training_error", error.message or "Training failed.")
    if rc < 0:
        message = f"The trainer process died from signal {signal.Signals(-rc).name}."
        return Outcome("failed", rc, "trainer_killed", message + facts.log_tail)
    return Outcome("failed", rc, "trainer_crashed", f"The trainer exited with status {rc}." + facts.log_tail)


def is_retryable(outcome: Outcome, facts: AttemptFacts) -> bool:
    """Whether a failed attempt may succeed if run again: a reported error code (bad data, OOM, NaN,
    config) will fail again; a crash, a kill, a dead rank or an upload failure may not."""
    return facts.error is None or outcome.reason in ("upload_failed", "rank_died")
