"""Every line the worker logs while it runs a job carries the job id, the attempt and the worker id,
including lines from the supervisor's heartbeat thread (a real fake-trainer subprocess, a real loopback API)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.worker.conftest import JOB_ID, TRAINER_ARGV
from tests.worker.fake_api import State
from worker.api_client import ApiClient
from worker.settings import WorkerSettings
from worker.supervisor import Supervisor
from worker.tasks import execute_job


def test_job_lines_carry_job_attempt_and_worker(
    settings: WorkerSettings,
    api: ApiClient,
    api_state: State,
    log_lines: Callable[[], list[dict[str, Any]]],
) -> None:
    def cancel_once_training(_: Supervisor) -> None:
        def during() -> None:
            deadline = time.monotonic() + 10
            while sum(e["type"] == "metrics" for e in api_state.events) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            api_state.action = "cancel"  # the next heartbeat (control thread) asks the trainer to stop

        threading.Thread(target=during, daemon=True).start()

    env = {**os.environ, "FAKE_STEPS": "100000", "FAKE_DELAY": "0.05"}
    outcome = execute_job(
        JOB_ID, settings, api=api, trainer_argv=TRAINER_ARGV, env=env, on_supervisor=cancel_once_training
    )
    assert outcome is not None and (outcome.status, outcome.reason) == ("stopped", "cancelled")
    logging.getLogger("worker.tasks").info("after the job")

    lines = log_lines()
    ours = [e for e in lines if e["logger"].startswith("worker.")]
    messages = [e["message"] for e in ours]
    assert any("claimed attempt 1" in m for m in messages), messages
    assert any("asking trainer to stop (cancelled" in m for m in messages), messages  # the heartbeat thread
    assert any("trainer pid" in m for m in messages), messages
    for entry in ours[:-1]:
        assert (entry["job_id"], entry["attempt"], entry["worker"]) == (JOB_ID, 1, "test-worker"), entry
    assert ours[-1]["message"] == "after the job"
    assert not {"job_id", "attempt", "worker"} & set(ours[-1])
