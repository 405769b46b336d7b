"""The supervisor with a fake trainer (a real subprocess) against a real loopback HTTP server."""

from __future__ import annotations

import io
import json
import os
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.worker.conftest import JOB_ID, TRAINER_ARGV, claim_body
from tests.worker.fake_api import FakeApi, State
from worker.api_client import ApiClient
from worker.settings import WorkerSettings
from worker.supervisor import Outcome, Supervisor, metrics_message
from worker.tasks import execute_job


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Run:
    """execute_job in the test's thread, keeping the supervisor for inspection."""

    def __init__(self, settings: WorkerSettings, api: ApiClient, env: dict[str, str]) -> None:
        self.settings = settings
        self.api = api
        self.env = {**os.environ, **env}
        self.supervisor: Supervisor | None = None

    def __call__(self, during: Callable[[], None] | None = None) -> Outcome | None:
        def hook(supervisor: Supervisor) -> None:
            self.supervisor = supervisor
            if during is not None:
                threading.Thread(target=during, daemon=True).start()

        return execute_job(
            JOB_ID, self.settings, api=self.api, trainer_argv=TRAINER_ARGV, env=self.env, on_supervisor=hook
        )

    def assert_no_processes_left(self) -> None:
        assert self.supervisor is not None and self.supervisor.pid is not None
        pgid = self.supervisor.pid
        assert _wait_for(lambda: not _group_members(pgid), 2), f"left behind: {_group_members(pgid)}"
        helper_file = self.attempt_dir / "helper.pid"
        if helper_file.exists():
            helper = int(helper_file.read_text())
            assert _wait_for(lambda: not _running(helper), 2), "helper process survived"

    @property
    def attempt_dir(self) -> Path:
        return self.settings.work_path / JOB_ID / "attempt-1"


def _make(settings: WorkerSettings, api: ApiClient, **env: str) -> Run:
    return Run(settings, api, {key.upper(): value for key, value in env.items()})


def _metrics_events(state: State) -> list[dict[str, Any]]:
    return [e for e in state.events if e["type"] == "metrics"]


def test_metrics_message() -> None:
    assert metrics_message({"total_steps": 50, "train_loss": 0.91}, 10) == "Step 10/50: training loss=0.9100"
    assert metrics_message({"step": 3}, None) == "Step 3"
    assert (
        metrics_message({"total_steps": 10, "valid_loss": 0.5, "valid_preference_accuracy": 0.75}, 4)
        == "Step 4/10: validation loss=0.5000, validation preference accuracy=0.75"
    )
    # the samples callback's event: named by what it measured, not a bare "Step 2/10"
    samples = {"total_steps": 10, "samples/changed_fraction": 0.25, "samples/policy_logp_chosen": -3.2}
    assert metrics_message(samples, 2) == "Step 2/10: greedy samples differing from the reference=25%"


def test_success_relays_everything_in_order(settings: WorkerSettings, api: ApiClient, api_state: State) -> None:
    run = _make(settings, api, fake_steps="5", fake_delay="0.1", fake_checkpoint_every="2")
    outcome = run()
    assert outcome is not None and outcome.status == "succeeded", outcome

    request = json.loads((run.attempt_dir / "request.json").read_text())
    assert request["model_path"] == str((settings.models_path / "tiny-mistral").resolve())
    assert Path(request["train_file"]).read_bytes() == api_state.files["file-train"]
    assert Path(request["validation_file"]).read_bytes() == api_state.files["file-valid"]
    assert request["resume_from"] is None and request["attempt"] == 1 and request["seed"] == 7

    assert [e["seq"] for e in api_state.events] == list(range(len(api_state.events)))
    assert api_state.events[0]["message"] == "Training started"
    metrics = _metrics_events(api_state)
    assert [e["data"]["step"] for e in metrics] == [1, 2, 3, 4, 5]
    assert metrics[0]["message"] == "Step 1/5: training loss=1.0000"
    assert api_state.duplicates == 0

    assert [c.fields["step"] for c in api_state.checkpoints] == ["2", "4"]
    for ckpt in api_state.checkpoints:  # a step's events reach the API before its checkpoint
        before = [e["data"]["step"] for e in api_state.events[: ckpt.events_before] if e["type"] == "metrics"]
        assert int(ckpt.fields["step"]) in before, (ckpt.fields["step"], before)
    with zipfile.ZipFile(io.BytesIO(api_state.checkpoints[0].content)) as zf:
        assert sorted(zf.namelist()) == ["adapter_model.safetensors", "trainer_state.json"]
    assert json.loads(api_state.checkpoints[1].fields["metrics"]) == {"step": 4, "train_loss": 0.25}

    adapter, metrics_csv = api_state.artifacts
    assert adapter.fields == {"lease_token": "lease-abc", "name": "adapter"}
    assert adapter.filename == f"{JOB_ID}-adapter.zip"
    with zipfile.ZipFile(io.BytesIO(adapter.content)) as zf:
        assert sorted(zf.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert metrics_csv.fields["name"] == "metrics" and metrics_csv.filename == "metrics.csv"
    assert metrics_csv.content.startswith(b"step,train_loss\n")

    assert api_state.terminal == [
        (
            "finish",
            {
                "lease_token": "lease-abc",
                "trained_tokens": 500,
                "adapter_file_id": "file-adapter",
                "result_file_ids": ["file-metrics"],
            },
        )
    ]
    resolved = [h["resolved_hyperparameters"] for h in api_state.heartbeats if h["resolved_hyperparameters"]]
    assert resolved and resolved[0]["beta"] == 0.1
    # the terminal call comes after every event and upload
    actions = [a for _, a in api_state.calls]
    assert actions[0] == "claim" and actions[-1] == "finish"
    run.assert_no_processes_left()


def test_nothing_to_claim(settings: WorkerSettings, api: ApiClient, api_state: State) -> None:
    api_state.claimed = True
    assert _make(settings, api)() is None
    assert [a for _, a in api_state.calls] == ["claim"]


def test_unknown_model_fails_not_retryable(settings: WorkerSettings, api: ApiClient, api_state: State) -> None:
    api_state.claim["spec"]["model"] = "../../etc"
    outcome = _make(settings, api)()
    assert outcome is not None and outcome.status == "failed" and outcome.reason == "model_not_found"
    ((action, body),) = api_state.terminal
    assert action == "fail" and body["code"] == "model_not_found" and body["retryable"] is False


def test_resume_downloads_and_unzips_checkpoint(settings: WorkerSettings, api: ApiClient, api_state: State) -> None:
    api_state.claim = claim_body(resume=True)
    run = _make(settings, api, fake_steps="5")
    outcome = run()
    assert outcome is not None and outcome.status == "succeeded"
    request = json.loads((run.attempt_dir / "request.json").read_text())
    assert json.loads((Path(request["resume_from"]) / "trainer_state.json").read_text()) == {"global_step": 3}
    assert api_state.events[0]["message"] == "Resumed from step 3"
    assert [e["data"]["step"] for e in _metrics_events(api_state)] == [4, 5]


def _when_training(state: State, then: Callable[[], None]) -> Callable[[], None]:
    def during() -> None:
        _wait_for(lambda: len(_metrics_events(state)) >= 2)
        then()

    return during


def test_cancel_via_heartbeat_stops_cooperative_trainer(
    settings: WorkerSettings, api: ApiClient, api_state: State
) -> None:
    run = _make(settings, api, fake_steps="100000", fake_delay="0.05", fake_helper="1")
    started = time.monotonic()
    outcome = run(_when_training(api_state, lambda: setattr(api_state, "action", "cancel")))
    assert outcome is not None and (outcome.status, outcome.reason) == ("stopped", "cancelled")
    assert outcome.returncode == 75
    assert time.monotonic() - started < 5
    assert api_state.terminal == [("stopped", {"lease_token": "lease-abc", "reason": "cancelled"})]
    run.assert_no_processes_left()  # the helper ignores SIGTERM: killed with the group


@pytest.mark.parametrize(("action", "reason"), [("cancel", "cancelled"), ("pause", "paused")])
def test_cancel_and_pause_reach_the_trainer_without_waiting_for_a_heartbeat(
    settings: WorkerSettings, api: ApiClient, api_state: State, action: str, reason: str
) -> None:
    """Heartbeats every 30 s (the default): the request comes through the held ``GET .../control``."""
    settings = settings.model_copy(update={"heartbeat_seconds": 30.0})
    run = _make(settings, api, fake_steps="100000", fake_delay="0.05")
    outcome = run(_when_training(api_state, lambda: setattr(api_state, "action", action)))
    assert outcome is not None and (outcome.status, outcome.reason) == ("stopped", reason)
    assert api_state.terminal == [("stopped", {"lease_token": "lease-abc", "reason": reason})]
    assert "cancel" not in api_state.heartbeat_actions and "pause" not in api_state.heartbeat_actions
    assert api_state.control_answers >= 1
    run.assert_no_processes_left()


def test_a_run_that_ends_as_it_is_cancelled_is_stopped_without_an_upload_warning(
    settings: WorkerSettings, api: ApiClient, api_state: State
) -> None:
    """The trainer finishes before the cancel reaches it; the API then refuses the adapter (the job is
    cancelled): the attempt is reported stopped, not failed with "could not be uploaded"."""
    api_state.refuse_artifacts_as = "cancel"
    outcome = _make(settings, api, fake_steps="3")()
    assert outcome is not None and (outcome.status, outcome.reason) == ("stopped", "cancelled")
    assert api_state.terminal == [("stopped", {"lease_token": "lease-abc", "reason": "cancelled"})]
    assert not [e for e in api_state.events if "could not be uploaded" in e["message"]]


def test_cancel_kills_stubborn_trainer_group_after_grace(
    settings: WorkerSettings, api: ApiClient, api_state: State
) -> None:
    run = _make(settings, api, fake_mode="stubborn", fake_steps="100000", fake_delay="0.05", fake_helper="1")
    cancelled_at: list[float] = []

    def cancel() -> None:
        cancelled_at.append(time.monotonic())
        api_state.action = "cancel"

    outcome = run(_when_training(api_state, cancel))
    assert outcome is not None and (outcome.status, outcome.reason) == ("stopped", "cancelled")
    assert outcome.returncode == -9
    elapsed = time.monotonic() - cancelled_at[0]
    assert settings.stop_grace_seconds <= elapsed < settings.stop_grace_seconds + 3
    run.assert_no_processes_left()


def test_pause_saves_checkpoint_then_stopped(settings: WorkerSettings, api: ApiClient, api_state: State) -> None:
    run = _make(settings, api, fake_steps="100000", fake_delay="0.05")
    outcome = run(_when_training(api_state, lambda: setattr(api_state, "action", "pause")))
    assert outcome is not None and (outcome.status, outcome.reason) == ("stopped", "paused")
    assert len(api_state.checkpoints) == 1
    assert api_state.terminal == [("stopped", {"lease_token": "lease-abc", "reason": "paused"})]
    assert [a for _, a in api_state.calls].index("checkpoints") < [a for _, a in api_state.calls].index("stopped")
    run.assert_no_processes_left()


def test_worker_shutdown_checkpoints_then_stopped(settings: WorkerSettings, api: ApiClient, api_state: State) -> None:
    run = _make(settings, api, fake_steps="100000", fake_delay="0.05")

    def shutdown() -> None:
        assert run.supervisor is not None
        run.supervisor.shutdown()

    outcome = run(_when_training(api_state, shutdown))
    assert outcome is not None and (outcome.status, outcome.reason) == ("stopped", "shutdown")
    assert len(api_state.checkpoints) == 1
    assert api_state.terminal[-1] == ("stopped", {"lease_token": "lease-abc", "reason": "shutdown"})
    run.assert_no_processes_left()


@pytest.mark.parametrize(
    ("mode", "code", "retryable", "needle"),
    [
        ("crash", "trainer_crashed", True, "simulated crash"),
        ("killed", "trainer_killed", True, "SIGKILL"),
        ("error", "nan_loss", False, "NaN"),
    ],
)
def test_trainer_failure(
    settings: WorkerSettings, api: ApiClient, api_state: State, mode: str, code: str, retryable: bool, needle: str
) -> None:
    run = _make(settings, api, fake_mode=mode, fake_steps="10", fake_helper="1")
    outcome = run()
    assert outcome is not None and (outcome.status, outcome.reason) == ("failed", code)
    ((action, body),) = api_state.terminal
    assert action == "fail" and body["code"] == code and body["retryable"] is retryable
    assert needle in body["message"]
    run.assert_no_processes_left()


def test_lease_lost_stops_trainer_and_writes_nothing(
    settings: WorkerSettings, api: ApiClient, api_state: State
) -> None:
    run = _make(settings, api, fake_steps="100000", fake_delay="0.05", fake_helper="1")
    outcome = run(_when_training(api_state, lambda: setattr(api_state, "lease_lost", True)))
    assert outcome is not None and outcome.status == "lease_lost"
    assert api_state.terminal == []
    run.assert_no_processes_left()


def test_api_outage_buffers_events_and_delivers_each_once(
    settings: WorkerSettings, api: ApiClient, api_state: State, fake_api: FakeApi
) -> None:
    steps = 50
    run = _make(settings, api, fake_steps=str(steps), fake_delay="0.05")
    seen_during_outage: list[int] = []

    def outage() -> None:
        _wait_for(lambda: len(_metrics_events(api_state)) >= 5)
        fake_api.stop()
        time.sleep(1.5)
        assert run.supervisor is not None
        seen_during_outage.append(run.supervisor.events.pending)
        fake_api.start()

    outcome = run(outage)
    assert outcome is not None and outcome.status == "succeeded"
    assert seen_during_outage and seen_during_outage[0] > 5  # really buffered while down
    assert [e["seq"] for e in api_state.events] == list(range(len(api_state.events)))
    assert [e["data"]["step"] for e in _metrics_events(api_state)] == list(range(1, steps + 1))
    assert api_state.terminal[0][0] == "finish"
