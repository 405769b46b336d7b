"""``worker.outcome.decide``: how an attempt ended, from what the supervisor saw (no process, no API)."""

from __future__ import annotations

import signal

import pytest

from contracts.internal import StopReason, TrainerReport
from worker.outcome import AttemptFacts, Outcome, decide, is_retryable
from worker.training.request import EXIT_OK, EXIT_STOPPED

DONE = TrainerReport(kind="done", data={"trained_tokens": 500})
NAN = TrainerReport(kind="error", code="nan_loss", message="training diverged at step 5")
TAIL = " Last output:\nTraceback: boom"


def test_a_finished_run_with_its_adapter_uploaded_succeeded() -> None:
    assert decide(AttemptFacts(EXIT_OK, done=DONE, adapter_uploaded=True)) == Outcome("succeeded", EXIT_OK)


def test_a_stop_asked_too_late_does_not_undo_an_uploaded_adapter() -> None:
    facts = AttemptFacts(EXIT_OK, stop_reason="cancelled", done=DONE, adapter_uploaded=True)
    assert decide(facts).status == "succeeded"


@pytest.mark.parametrize("reason", ["cancelled", "paused"])
def test_a_run_that_finished_as_it_was_stopped_is_stopped_without_an_upload_warning(reason: StopReason) -> None:
    asked = AttemptFacts(EXIT_OK, stop_reason=reason, done=DONE, upload_failed=True, refused_as_stopped=True)
    assert decide(asked) == Outcome("stopped", EXIT_OK, reason)
    # the API refused the adapter before the worker heard of the stop: still stopped, not failed
    refused = AttemptFacts(EXIT_OK, done=DONE, upload_failed=True, refused_as_stopped=True)
    assert decide(refused) == Outcome("stopped", EXIT_OK, "cancelled")


def test_an_adapter_that_could_not_be_uploaded_fails_retryably() -> None:
    facts = AttemptFacts(EXIT_OK, done=DONE, upload_failed=True)
    outcome = decide(facts)
    assert outcome == Outcome("failed", EXIT_OK, "upload_failed", "The trained adapter could not be uploaded.")
    assert is_retryable(outcome, facts)


def test_exit_0_without_an_adapter_is_a_protocol_error() -> None:
    assert decide(AttemptFacts(EXIT_OK, done=DONE)).reason == "trainer_protocol_error"


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        (AttemptFacts(EXIT_STOPPED, stop_reason="paused"), "paused"),
        (AttemptFacts(EXIT_STOPPED, stop_reason="shutdown"), "shutdown"),
        (AttemptFacts(EXIT_STOPPED), "shutdown"),  # stopped by a signal nobody here sent: run it again
        (AttemptFacts(-signal.SIGKILL, stop_reason="cancelled"), "cancelled"),  # killed after the grace
        (AttemptFacts(-signal.SIGKILL, stop_reason="paused"), "paused"),
        (AttemptFacts(1, stop_reason="cancelled", error=NAN), "cancelled"),  # cancel wins over an error
    ],
)
def test_stopped(facts: AttemptFacts, reason: str) -> None:
    assert decide(facts) == Outcome("stopped", facts.returncode, reason)


def test_a_reported_error_fails_with_its_code_and_is_not_retried() -> None:
    facts = AttemptFacts(1, error=NAN, log_tail=TAIL)
    outcome = decide(facts)
    assert outcome == Outcome("failed", 1, "nan_loss", "training diverged at step 5")
    assert not is_retryable(outcome, facts)
    # a pause that ran into an error: the error is what happened
    assert decide(AttemptFacts(1, stop_reason="paused", error=NAN)).reason == "nan_loss"


def test_a_crash_or_a_kill_fails_retryably_with_the_trainers_last_output() -> None:
    crashed = AttemptFacts(3, log_tail=TAIL)
    outcome = decide(crashed)
    assert outcome == Outcome("failed", 3, "trainer_crashed", "The trainer exited with status 3." + TAIL)
    assert is_retryable(outcome, crashed)
    killed = decide(AttemptFacts(-signal.SIGKILL, log_tail=TAIL))
    assert (
        killed.reason == "trainer_killed" and killed.message == "The trainer process died from signal SIGKILL." + TAIL
    )
