"""Fault injection against a live stack: real ``ipo serve``, real Celery workers, real TRL trainers.

One test per fault; each asserts on the final state of the ledger (read straight from the database)
and prints what it observed (``pytest -s``), which docs/reliability.md reports.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from celery import Celery

from contracts.internal import TASK_NAME
from tests.reliability.conftest import Stack, group_alive, make_stack, wait_for
from tests.reliability.services import ThrowawayPostgres, ThrowawayRedis

pytestmark = [pytest.mark.slow]

STEPS = 20
CKPT = 4


def report(name: str, **facts: object) -> None:
    print(f"\nRELIABILITY {name}: " + ", ".join(f"{k}={v}" for k, v in facts.items()), flush=True)


def resumed_from(stack: Stack, job_id: str, attempt: int) -> int | None:
    for e in stack.events(job_id):
        m = re.match(rf"Attempt {attempt} started on worker \S+(?:, resuming from step (\d+))?$", e.message)
        if m:
            return int(m.group(1)) if m.group(1) else None
    raise AssertionError(f"no start event for attempt {attempt}")


def assert_clean_history(stack: Stack, job_id: str, total: int = STEPS) -> dict[int, list[int]]:
    """Per attempt: event seqs strictly increasing with no gap or duplicate; training steps strictly
    increasing; each later attempt starts right after the checkpoint it resumed from; the last one
    reaches the final step."""
    seqs = stack.seqs_by_attempt(job_id)
    for attempt, s in seqs.items():
        assert s == list(range(len(s))), (attempt, s)
    steps = stack.steps_by_attempt(job_id)
    for attempt, st in steps.items():
        assert st == sorted(set(st)), (attempt, st)
        start = resumed_from(stack, job_id, attempt)
        assert st[0] == (start or 0) + 1, (attempt, start, st)
    last = max(steps)
    assert steps[last][-1] == total
    return steps


def attempt_started_at(stack: Stack, job_id: str, attempt: int) -> float:
    for e in stack.events(job_id):
        if e.message.startswith(f"Attempt {attempt} started"):
            return e.created_at.timestamp()
    raise AssertionError(f"attempt {attempt} never started")


def first_step_at(stack: Stack, job_id: str, attempt: int) -> float:
    for e in stack.events(job_id):
        if e.attempt == attempt and e.type == "metrics":
            return e.created_at.timestamp()
    raise AssertionError(f"attempt {attempt} reported no step")


# ---------------------------------------------------------------------------------------------------


def test_trainer_killed_mid_run_resumes_from_checkpoint(stack: Stack) -> None:
    worker = stack.start_worker()
    job_id = stack.submit(max_steps=STEPS, checkpoint_every=CKPT)
    stack.wait_step(job_id, 2 * CKPT + 1, checkpoint=2 * CKPT)
    last_ckpt = max(c.step for c in stack.checkpoints(job_id))
    pid = stack.trainer_pid(worker)
    assert pid, stack.diagnostics(job_id)
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)

    job = stack.wait_status(job_id, "succeeded", "failed")
    assert job.status == "succeeded", (job.error, stack.diagnostics(job_id))
    assert job.attempt == 2 and job.failed_attempts == 1
    steps = assert_clean_history(stack, job_id)
    resumed = resumed_from(stack, job_id, 2)
    assert resumed is not None and resumed >= last_ckpt
    assert any("trainer_killed" in e.message for e in stack.events(job_id))
    report(
        "trainer kill -9",
        killed_at_step=steps[1][-1],
        resumed_from_step=resumed,
        attempts=job.attempt,
        seconds_to_next_claim=round(attempt_started_at(stack, job_id, 2) - killed_at, 1),
        seconds_to_first_resumed_step=round(first_step_at(stack, job_id, 2) - killed_at, 1),
    )


def test_worker_killed_lease_expires_and_new_worker_resumes(stack: Stack) -> None:
    first = stack.start_worker()
    job_id = stack.submit(max_steps=STEPS, checkpoint_every=CKPT)
    stack.wait_step(job_id, 2 * CKPT + 1, checkpoint=2 * CKPT)
    last_ckpt = max(c.step for c in stack.checkpoints(job_id))
    trainer = stack.trainer_pid(first)
    assert trainer
    killed_at = time.time()
    os.killpg(first.pid, signal.SIGKILL)  # the Celery main process and its pool child
    first.wait()
    stack.start_worker()
    # The trainer has its own process group, so it outlives its worker; it dies on its next report
    # (the pipe has no reader any more).
    wait_for("the orphaned trainer to exit", lambda: not group_alive(trainer), 60)
    orphan_gone = time.time() - killed_at

    job = stack.wait_status(job_id, "succeeded", "failed")
    assert job.status == "succeeded", (job.error, stack.diagnostics(job_id))
    assert job.attempt == 2 and job.failed_attempts == 1
    assert job.error is None
    steps = assert_clean_history(stack, job_id)
    resumed = resumed_from(stack, job_id, 2)
    assert resumed is not None and resumed >= last_ckpt
    lost = [e for e in stack.events(job_id) if "stopped heartbeating (lease expired)" in e.message]
    assert len(lost) == 1
    report(
        "worker kill -9",
        killed_at_step=steps[1][-1],
        resumed_from_step=resumed,
        attempts=job.attempt,
        seconds_to_lease_reaped=round(lost[0].created_at.timestamp() - killed_at, 1),
        seconds_to_next_claim=round(attempt_started_at(stack, job_id, 2) - killed_at, 1),
        orphan_trainer_exited_after_s=round(orphan_gone, 1),
    )


def test_duplicate_message_runs_once(stack: Stack) -> None:
    job_id = stack.submit(max_steps=6, checkpoint_every=6)
    wait_for("the dispatcher to send the doorbell", lambda: stack.job(job_id).dispatched_at, 10)
    sender = Celery("dup", broker=stack.redis.url, set_as_current=False)
    for _ in range(2):  # the same message, twice more
        sender.send_task(TASK_NAME, kwargs={"job_id": job_id}, queue=stack.queue)
    workers = [stack.start_worker(), stack.start_worker()]  # both race for the doorbells

    job = stack.wait_status(job_id, "succeeded", "failed")
    assert job.status == "succeeded", (job.error, stack.diagnostics(job_id))
    assert job.attempt == 1 and job.failed_attempts == 0
    starts = [e for e in stack.events(job_id) if e.message.startswith("Attempt ")]
    assert len(starts) == 1
    # Every doorbell is consumed; all but the first find nothing to claim.
    wait_for(
        "the extra deliveries to be consumed",
        lambda: sum(stack.worker_log(w).count("nothing to claim") for w in workers) >= 2,
        60,
    )
    received = sum(stack.worker_log(w).count("] received") for w in workers)
    refused = sum(stack.worker_log(w).count("nothing to claim") for w in workers)
    report("duplicate delivery", deliveries=received, claims=1, refused_claims=refused, attempt=job.attempt)


def test_redis_flushed_before_pickup_sweeper_redispatches(stack: Stack) -> None:
    job_id = stack.submit(max_steps=6, checkpoint_every=6)
    wait_for("the dispatcher to send the doorbell", lambda: stack.job(job_id).dispatched_at, 10)
    with stack.redis.client() as r:
        assert r.llen(stack.queue) >= 1
        r.flushall()
        assert r.llen(stack.queue) == 0
    flushed_at = time.time()
    stack.start_worker()

    job = stack.wait_status(job_id, "succeeded", "failed")
    assert job.status == "succeeded", (job.error, stack.diagnostics(job_id))
    assert job.attempt == 1
    resent = [o for o in stack.outbox(job_id) if o.sent_at and o.sent_at.timestamp() > flushed_at]
    assert resent, "the sweeper never re-sent the lost doorbell"
    report(
        "redis FLUSHALL",
        outbox_rows=len(stack.outbox(job_id)),
        seconds_flush_to_resend=round(resent[0].sent_at.timestamp() - flushed_at, 1),  # type: ignore[union-attr]
        seconds_flush_to_claim=round(attempt_started_at(stack, job_id, 1) - flushed_at, 1),
        attempt=job.attempt,
    )


def test_postgres_restart_during_run(stack: Stack) -> None:
    stack.start_worker()
    job_id = stack.submit(max_steps=STEPS, checkpoint_every=CKPT)
    stack.wait_step(job_id, 5)
    stopped_at = time.monotonic()
    stack.pg.stop("fast")
    outage = []
    try:
        while time.monotonic() - stopped_at < 6:
            r = stack.http.get(f"/v1/fine_tuning/jobs/{job_id}", timeout=10)
            outage.append((r.status_code, r.headers.get("retry-after")))
            time.sleep(0.5)
        ready = httpx.get(f"{stack.url}/readyz", timeout=10)
    finally:
        stack.pg.start()
    down_for = time.monotonic() - stopped_at
    assert outage and all(code == 503 and retry for code, retry in outage), outage
    assert ready.status_code == 503 and ready.headers.get("retry-after")
    healthy_after = stack.wait_ready(30)
    assert stack.http.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200

    job = stack.wait_status(job_id, "succeeded", "failed")
    assert job.status == "succeeded", (job.error, stack.diagnostics(job_id))
    assert job.attempt == 1 and job.failed_attempts == 0, stack.diagnostics(job_id)
    steps = assert_clean_history(stack, job_id)
    assert steps[1] == list(range(1, STEPS + 1))  # every step's report arrived, once
    report(
        "postgres restart",
        outage_s=round(down_for, 1),
        responses_503=len(outage),
        healthy_after_restart_s=round(healthy_after, 1),
        attempts=job.attempt,
        step_reports=len(steps[1]),
        events=len(stack.events(job_id)),
    )


def test_api_restart_during_run(stack: Stack) -> None:
    stack.start_worker()
    job_id = stack.submit(max_steps=STEPS, checkpoint_every=CKPT)
    job = stack.wait_step(job_id, 5)
    step_at_kill = job.step
    killed_at = time.monotonic()
    stack.kill_api()
    time.sleep(3)
    stack.start_api()
    down_for = time.monotonic() - killed_at

    job = stack.wait_status(job_id, "succeeded", "failed")
    assert job.status == "succeeded", (job.error, stack.diagnostics(job_id))
    assert job.attempt == 1 and job.failed_attempts == 0, stack.diagnostics(job_id)
    steps = assert_clean_history(stack, job_id)
    assert steps[1] == list(range(1, STEPS + 1))
    report(
        "API kill -9 + restart",
        api_down_s=round(down_for, 1),
        killed_at_step=step_at_kill,
        attempts=job.attempt,
        step_reports=len(steps[1]),
    )


def test_cancel_during_run(stack: Stack) -> None:
    worker = stack.start_worker()
    job_id = stack.submit(max_steps=STEPS, checkpoint_every=CKPT)
    stack.wait_step(job_id, 3)
    trainer = stack.trainer_pid(worker)
    assert trainer
    asked = time.monotonic()
    r = stack.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    wait_for("the trainer's process group to go", lambda: not group_alive(trainer), 30, interval=0.1)
    group_gone = time.monotonic() - asked
    wait_for("the lease to be released", lambda: stack.job(job_id).lease_token is None, 30)
    released = time.monotonic() - asked
    cancel_event = next(e for e in stack.events(job_id) if e.message == "Job cancelled by user")
    settled = stack.events(job_id)
    time.sleep(5)
    later = stack.events(job_id)
    assert [e.id for e in later] == [e.id for e in settled]  # nothing more arrives
    after_cancel = [e for e in later if e.id > cancel_event.id]
    # No progress, checkpoint or "worker lost" event: the worker stopped and released the lease itself.
    assert not after_cancel, [e.message for e in after_cancel]
    assert not [c for c in stack.checkpoints(job_id) if c.created_at > cancel_event.created_at]
    job = stack.job(job_id)
    assert job.status == "cancelled" and job.attempt == 1
    report(
        "cancel",
        status_after_s=0,
        trainer_group_gone_s=round(group_gone, 1),
        lease_released_s=round(released, 1),
        events_after_cancel=[e.message for e in after_cancel],
    )


@pytest.fixture
def default_heartbeat_stack(
    pg: ThrowawayPostgres, redis_server: ThrowawayRedis, tiny_models_dir: Path, tmp_path: Path
) -> Iterator[Stack]:
    """The API with the default 30 s heartbeat (and a lease long enough for it)."""
    s = make_stack(pg, redis_server, tmp_path, tiny_models_dir, IPO_HEARTBEAT_SECONDS="30", IPO_LEASE_SECONDS="120")
    try:
        s.start_api()
        yield s
    finally:
        s.close()


def test_cancel_and_pause_reach_the_trainer_before_the_next_heartbeat(default_heartbeat_stack: Stack) -> None:
    """Issue 13, fault 9: with heartbeats 30 s apart, a cancel or pause still stops the trainer within
    seconds (the worker holds ``GET .../control`` open), and the job ends as asked with no upload warning.
    Whole-dataset batches keep each step slow, so 200 steps would take minutes."""
    stack = default_heartbeat_stack
    worker = stack.start_worker()
    _stop_reaches_the_trainer(stack, worker, "cancel", "cancelled")
    _stop_reaches_the_trainer(stack, worker, "pause", "paused")


def _stop_reaches_the_trainer(stack: Stack, worker: subprocess.Popen[bytes], verb: str, status: str) -> None:
    job_id = stack.submit(max_steps=200, checkpoint_every=1000, batch_size=64)
    stack.wait_step(job_id, 3)
    trainer = stack.trainer_pid(worker)
    assert trainer
    asked = time.monotonic()
    r = stack.http.post(f"/v1/fine_tuning/jobs/{job_id}/{verb}")
    assert r.status_code == 200 and r.json()["status"] == status, r.text
    # A deadline, not the check: which path delivered the stop is read from the worker's log below.
    wait_for(f"the trainer to stop on {verb}", lambda: not group_alive(trainer), 60, interval=0.1)
    stopped_s = time.monotonic() - asked
    wait_for("the lease to be released", lambda: stack.job(job_id).lease_token is None, 30)
    job = stack.job(job_id)
    assert job.status == status and job.attempt == 1 and (job.step or 0) < 200, stack.diagnostics(job_id)
    warnings = [e.message for e in stack.events(job_id) if "could not be uploaded" in e.message]
    assert not warnings, warnings
    # The stop came through the held control request (the API answered it on the status change), not a
    # heartbeat: the worker logs each such answer.
    assert f"the control request asks to {verb}" in stack.worker_log(worker), stack.worker_log(worker)[-3000:]
    report(f"{verb} with 30 s heartbeats", trainer_stopped_s=round(stopped_s, 1), at_step=job.step)


def test_pause_then_resume_continues_at_the_same_step(stack: Stack) -> None:
    stack.start_worker()
    # Whole-dataset batches make each step ~8x slower, so the pause lands mid-run (at 8 pairs a step the
    # tiny model runs ~15 steps/s and could finish before the heartbeat relayed the pause). Pausing on the
    # last step is tested in tests/training/test_train.py::test_resuming_at_the_last_step_trains_nothing_more.
    total = STEPS
    job_id = stack.submit(max_steps=total, checkpoint_every=100, batch_size=64)  # only the pause checkpoint
    stack.wait_step(job_id, 5)
    asked = time.monotonic()
    r = stack.http.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert r.status_code == 200 and r.json()["status"] == "paused", r.text
    wait_for("the pause to complete", lambda: (j := stack.job(job_id)).lease_token is None and j, 60)
    paused_in = time.monotonic() - asked
    job = stack.job(job_id)
    assert job.status == "paused"
    ckpts = stack.checkpoints(job_id)
    assert len(ckpts) == 1, [c.step for c in ckpts]
    pause_step = ckpts[0].step
    assert pause_step == job.step, (pause_step, job.step)
    r = stack.http.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text

    job = stack.wait_status(job_id, "succeeded", "failed")
    assert job.status == "succeeded", (job.error, stack.diagnostics(job_id))
    assert job.attempt == 2 and job.failed_attempts == 0
    assert resumed_from(stack, job_id, 2) == pause_step
    assert pause_step < total, "the pause landed mid-run"
    steps = assert_clean_history(stack, job_id, total)
    assert steps[2][0] == pause_step + 1
    report(
        "pause/resume",
        paused_at_step=pause_step,
        pause_completed_s=round(paused_in, 1),
        resumed_from_step=resumed_from(stack, job_id, 2),
        first_step_after_resume=steps[2][0],
    )


def test_fenced_off_worker_writes_are_refused(stack: Stack) -> None:
    stale = stack.start_worker()
    job_id = stack.submit(max_steps=STEPS, checkpoint_every=CKPT)
    stack.wait_step(job_id, 3)
    old = stack.job(job_id)
    trainer = stack.trainer_pid(stale)
    assert trainer
    # Freeze the worker (and its trainer) past its lease: the reaper requeues, another worker claims.
    os.killpg(stale.pid, signal.SIGSTOP)
    os.killpg(trainer, signal.SIGSTOP)
    stack.start_worker()
    wait_for(
        "another worker to claim attempt 2",
        lambda: (j := stack.job(job_id)).attempt == 2 and j.lease_token and (j.step or 0) >= 1,
        120,
    )
    before = stack.job(job_id)
    events_before = len(stack.events(job_id))

    # The stale token, straight at the protocol: every leased write is refused.
    w = httpx.Client(base_url=stack.url, headers={"Authorization": "Bearer reliability-worker-token"}, timeout=30)
    base = f"/internal/v1/jobs/{job_id}"
    token = old.lease_token
    answers = {
        "heartbeat": w.post(f"{base}/heartbeat", json={"lease_token": token}),
        "events": w.post(
            f"{base}/events",
            json={
                "lease_token": token,
                "events": [
                    {"seq": 999, "type": "message", "level": "info", "message": "stale", "created_at": int(time.time())}
                ],
            },
        ),
        "checkpoints": w.post(
            f"{base}/checkpoints",
            data={"lease_token": token, "step": "99"},
            files={"file": ("x.zip", b"PK\x05\x06" + b"\0" * 18)},
        ),
        "artifacts": w.post(
            f"{base}/artifacts", data={"lease_token": token, "name": "adapter"}, files={"file": ("a.zip", b"x")}
        ),
        "finish": w.post(f"{base}/finish", json={"lease_token": token, "adapter_file_id": "file-x"}),
    }
    assert {k: r.status_code for k, r in answers.items()} == dict.fromkeys(answers, 409), {
        k: r.text for k, r in answers.items()
    }

    # Now thaw the stale worker: its next heartbeat is refused and it stops writing.
    os.killpg(trainer, signal.SIGCONT)
    os.killpg(stale.pid, signal.SIGCONT)
    wait_for("the stale worker to notice", lambda: "lease lost" in stack.worker_log(stale), 30)
    wait_for("the stale trainer to stop", lambda: not group_alive(trainer), 30)
    after = stack.job(job_id)
    assert (after.attempt, after.lease_token, after.status) == (before.attempt, before.lease_token, "running")
    stale_events = [e for e in stack.events(job_id)[events_before:] if e.attempt == 1]
    assert not stale_events, [e.message for e in stale_events]
    assert not [e for e in stack.events(job_id) if e.message == "stale"]

    job = stack.wait_status(job_id, "succeeded", "failed")
    assert job.status == "succeeded", (job.error, stack.diagnostics(job_id))
    assert job.attempt == 2
    assert all(c.step != 99 for c in stack.checkpoints(job_id))
    assert_clean_history(stack, job_id)
    report(
        "fenced-off worker",
        stale_write_statuses={k: r.status_code for k, r in answers.items()},
        stale_events_accepted=len(stale_events),
        final_attempt=job.attempt,
    )


def test_job_crashing_every_attempt_fails_after_max_attempts(stack: Stack) -> None:
    stack.start_worker(IPO_TRAINER_MODULE="tests.reliability.crashing_trainer")
    started = time.monotonic()
    job_id = stack.submit(max_steps=STEPS)
    job = stack.wait_status(job_id, "succeeded", "failed", timeout=120)
    assert job.status == "failed"
    assert job.attempt == 3 and job.failed_attempts == 3
    assert job.error and job.error["code"] == "trainer_crashed"
    assert "simulated crash in attempt 3" in job.error["message"]
    assert "gave up after 3 failed attempts" in job.error["message"]
    api = stack.api_job(job_id)
    assert api["status"] == "failed" and api["error"]["code"] == "trainer_crashed"
    report(
        "crash every attempt",
        attempts=job.attempt,
        seconds_to_failed=round(time.monotonic() - started, 1),
        error=job.error["message"].splitlines()[0],
    )


def test_sigterm_worker_checkpoints_and_another_worker_resumes(stack: Stack) -> None:
    first = stack.start_worker()
    job_id = stack.submit(max_steps=STEPS, checkpoint_every=100)  # only the shutdown checkpoint
    stack.wait_step(job_id, 5)
    asked = time.monotonic()
    first.send_signal(signal.SIGTERM)  # what a deploy does to the Celery main process
    stack.start_worker()
    first.wait(60)
    exit_s = time.monotonic() - asked
    assert first.returncode == 0, stack.worker_log(first)[-3000:]

    job = stack.wait_status(job_id, "succeeded", "failed")
    assert job.status == "succeeded", (job.error, stack.diagnostics(job_id))
    assert job.attempt == 2 and job.failed_attempts == 0
    messages = [e.message for e in stack.events(job_id)]
    assert "Worker stopped (shutdown); attempt 1 requeued" in messages
    ckpts = [c for c in stack.checkpoints(job_id) if c.attempt == 1]
    assert len(ckpts) == 1
    steps = assert_clean_history(stack, job_id)
    assert resumed_from(stack, job_id, 2) == ckpts[0].step == steps[1][-1]
    report(
        "SIGTERM (deploy)",
        checkpoint_step=ckpts[0].step,
        old_worker_exit_s=round(exit_s, 1),
        exit_code=first.returncode,
        resumed_from_step=resumed_from(stack, job_id, 2),
        attempts=job.attempt,
    )
