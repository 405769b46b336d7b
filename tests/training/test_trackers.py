"""A job's integrations on real trackers: a real MLflow tracking server (SQLite backend, local artifact
store, started here on a free loopback port) and W&B in offline mode (its run file read back). Each run
is compared with what the job itself reported (the reports that become its metrics events)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from contracts.integrations import parse_integrations
from contracts.method import Method
from ipo_cli.processes import free_port
from tests.tracking_readback import mlflow_history, read_wandb
from tests.tracking_readback import mlflow_server as start_mlflow_server
from worker.training.callbacks import StopFlag
from worker.training.reporter import ListReporter
from worker.training.request import EXIT_OK, EXIT_STOPPED, TrainRequest
from worker.training.run import train
from worker.training.trackers import RUN_IDS_FILE

mlflow = pytest.importorskip("mlflow")  # the worker's optional extra `tracking` (in `make venv`)
wandb = pytest.importorskip("wandb")

LOGGED = ("train_loss", "ipo_margin", "ipo_margin_target", "preference_accuracy", "learning_rate")
LOGGED_VALID = ("valid_loss", "valid_preference_accuracy", "valid_ipo_margin")


def _request(
    model: Path,
    data: tuple[Path, Path],
    out: Path,
    integrations: list[Any],
    job_id: str = "ftjob-track1",
    **hp: Any,
) -> TrainRequest:
    return TrainRequest(
        job_id=job_id,
        attempt=1,
        model_path=str(model),
        train_file=str(data[0]),
        validation_file=str(data[1]),
        output_dir=str(out),
        seed=0,
        device="cpu",
        method=Method.model_validate({"type": "ipo", "ipo": {"hyperparameters": hp}}),
        integrations=parse_integrations(integrations),
        lineage={"training_file": "file-train", "parent_jobs": "ftjob-root"},
    )


def _reported(*reporters: ListReporter) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` of every number the job reported (its metrics events)."""
    out: dict[str, dict[int, float]] = {}
    for reporter in reporters:
        for report in reporter.of_kind("metrics"):
            data = report.data or {}
            for key, value in data.items():
                if key not in ("step", "total_steps") and isinstance(value, int | float):
                    out.setdefault(key, {})[int(data["step"])] = float(value)
    return out


def _same_history(logged: list[tuple[int, float]], reported: dict[int, float], key: str) -> None:
    """The tracker holds each reported step of ``key`` once, with the reported value."""
    assert [step for step, _ in logged] == sorted(reported), (key, logged, reported)  # no step twice, none missing
    assert [value for _, value in logged] == pytest.approx([reported[s] for s in sorted(reported)]), key


class HookedReporter(ListReporter):
    """A ``ListReporter`` that calls ``on_warning(message)`` (synchronously, in the trainer's thread) at each
    warning event: the test brings a tracker up at a known point of the run."""

    def __init__(self, on_warning: Any) -> None:
        super().__init__()
        self.on_warning = on_warning

    def event(self, message: str, level: Any = "info", data: dict[str, Any] | None = None) -> None:
        super().event(message, level, data)
        if level == "warn":
            self.on_warning(message)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.mark.slow
def test_mlflow_gets_the_jobs_metrics_params_tags_artifacts_and_a_model_version_across_a_resume(
    mlflow_server: str, tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    integrations = [
        {
            "type": "mlflow",
            "mlflow": {
                "tracking_uri": mlflow_server,
                "experiment_name": "ipo-tests",
                "tags": {"team": "nlp"},
                "register_model_as": "tiny-ipo-adapter",
            },
        }
    ]
    hp: dict[str, Any] = {"max_steps": 4, "batch_size": 4, "checkpoint_every": 2, "beta": 0.5}
    flag = StopFlag()
    flag.stop_at_step = 2  # attempt 1 pauses after step 2, attempt 2 resumes from its checkpoint
    first = ListReporter()
    request = _request(tiny_model_dir, demo_files, tmp_path / "a1", integrations, **hp)
    assert train(request, first, flag) == EXIT_STOPPED
    (checkpoint,) = [c for c in first.of_kind("checkpoint") if c.step == 2]
    saved = json.loads((Path(str(checkpoint.path)) / RUN_IDS_FILE).read_text())

    second = ListReporter()
    request = _request(tiny_model_dir, demo_files, tmp_path / "a2", integrations, **hp)
    request.attempt, request.resume_from = 2, checkpoint.path
    assert train(request, second) == EXIT_OK
    assert not [r for r in first.reports + second.reports if r.level == "warn" and "mlflow" in (r.message or "")]

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("ipo-tests")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])  # one run for both attempts
    assert run.info.run_id == saved["mlflow"] and run.info.status == "FINISHED"
    assert run.info.run_name == "ftjob-track1"

    reported = _reported(first, second)
    assert sorted(reported["train_loss"]) == [1, 2, 3, 4]
    for key in (*LOGGED, *LOGGED_VALID, "tokens_per_second"):
        _same_history(mlflow_history(client, run.info.run_id, key), reported[key], key)

    resolved = second.of_kind("resolved")[0].data or {}
    assert run.data.params["beta"] == "0.5" and run.data.params["total_steps"] == "4"
    assert set(run.data.params) == set(resolved)
    tags = run.data.tags
    assert tags["ipo.job_id"] == "ftjob-track1" and tags["ipo.attempt"] == "2" and tags["team"] == "nlp"
    assert tags["ipo.base_model"] == "tiny-mistral" and tags["ipo.parent_jobs"] == "ftjob-root"
    assert tags["ipo.training_file"] == "file-train"

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts and "adapter/adapter_config.json" in artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "metrics")] == ["metrics/metrics.csv"]
    local = Path(client.download_artifacts(run.info.run_id, "adapter/adapter_model.safetensors", str(tmp_path)))
    assert local.read_bytes() == (tmp_path / "a2" / "adapter" / "adapter_model.safetensors").read_bytes()

    (version,) = client.search_model_versions("name='tiny-ipo-adapter'")
    assert version.run_id == run.info.run_id and version.version == "1"
    assert version.tags["base_model"] == "tiny-mistral" and version.tags["ipo.job_id"] == "ftjob-track1"
    assert str(version.source).endswith("/adapter")


@pytest.mark.slow
def test_wandb_offline_run_holds_the_jobs_metrics_and_config(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    integrations = [{"type": "wandb", "wandb": {"project": "align", "name": "tiny run", "tags": ["ci"]}}]
    reporter = ListReporter()
    request = _request(tiny_model_dir, demo_files, tmp_path / "run", integrations, max_steps=3, batch_size=4)
    assert train(request, reporter) == EXIT_OK
    assert not [r for r in reporter.reports if r.level == "warn" and "wandb" in (r.message or "")]

    (run_file,) = (tmp_path / "wandb-dir").glob("wandb/offline-run-*/run-ftjob-track1.wandb")
    history, config, run = read_wandb(run_file)
    assert run["run_id"] == "ftjob-track1" and run["display_name"] == "tiny run" and "ci" in run["tags"]
    reported = _reported(reporter)
    for key in (*LOGGED, *LOGGED_VALID, "tokens_per_second"):
        logged = {int(row["_step"]): row[key] for row in history if key in row}
        assert logged == pytest.approx(reported[key]), (key, logged, reported[key], history)
    resolved = reporter.of_kind("resolved")[0].data or {}
    assert config["beta"] == resolved["beta"] and config["total_steps"] == 3
    assert config["ipo"]["ipo.job_id"] == "ftjob-track1"


def test_a_tracker_that_is_down_never_fails_the_training(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    integrations = [{"type": "mlflow", "mlflow": {"tracking_uri": closed, "register_model_as": "never"}}]
    reporter = ListReporter()
    request = _request(tiny_model_dir, demo_files, tmp_path / "run", integrations, max_steps=2, batch_size=4)
    assert train(request, reporter) == EXIT_OK
    kinds = [r.kind for r in reporter.reports]
    assert kinds[-1] == "done" and "error" not in kinds
    warnings = [r.message or "" for r in reporter.reports if r.level == "warn"]
    mlflow_warnings = [w for w in warnings if w.startswith("mlflow tracking failed")]
    assert len(mlflow_warnings) == 2, warnings  # once when it failed, once more after the retry at the end
    assert "logged to it once more at the end" in mlflow_warnings[0]
    assert "failed again at the end" in mlflow_warnings[1]
    assert len(_reported(reporter)["train_loss"]) == 2  # the job's own metrics are all there


@pytest.mark.slow
def test_a_tracker_that_comes_back_gets_the_whole_run_at_the_end(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """Down at the first report (refused connection), up before the end: the retry at the end logs the
    whole run (metrics, params, artifacts, model version) and the job has exactly one warning."""
    from mlflow.tracking import MlflowClient

    port = free_port()
    servers = ExitStack()
    urls: list[str] = []

    def bring_it_up(message: str) -> None:
        if message.startswith("mlflow tracking failed") and not urls:  # blocks training until it answers
            urls.append(servers.enter_context(start_mlflow_server(tmp_path / "mlflow", port)))

    integrations = [
        {"type": "mlflow", "mlflow": {"tracking_uri": f"http://127.0.0.1:{port}", "register_model_as": "late"}}
    ]
    reporter = HookedReporter(bring_it_up)
    request = _request(
        tiny_model_dir, demo_files, tmp_path / "run", integrations, "ftjob-late", max_steps=3, batch_size=4
    )
    with servers:
        assert train(request, reporter) == EXIT_OK
        assert urls, "the tracker never failed"
        warnings = [r.message or "" for r in reporter.reports if r.level == "warn"]
        assert len(warnings) == 1 and "logged to it once more at the end" in warnings[0], warnings
        recovered = [r.message or "" for r in reporter.of_kind("event") if "recovered" in (r.message or "")]
        assert len(recovered) == 1 and "logged at the end" in recovered[0], recovered
        assert reporter.reports[-1].kind == "done"

        client = MlflowClient(tracking_uri=urls[0])
        experiment = client.get_experiment_by_name("ipo-align")  # the default experiment
        assert experiment is not None
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED" and run.data.tags["ipo.job_id"] == "ftjob-late"
        reported = _reported(reporter)
        for key in (*LOGGED, *LOGGED_VALID, "tokens_per_second"):
            _same_history(mlflow_history(client, run.info.run_id, key), reported[key], key)
        assert set(run.data.params) == set(reporter.of_kind("resolved")[0].data or {})
        assert {"adapter", "metrics"} <= {a.path for a in client.list_artifacts(run.info.run_id)}  # + samples
        (version,) = client.search_model_versions("name='late'")
        assert version.run_id == run.info.run_id and version.tags["base_model"] == "tiny-mistral"


@pytest.mark.slow
def test_what_a_paused_attempt_could_not_log_is_logged_by_the_attempt_that_resumes(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """Down for all of attempt 1 (paused at step 2: its retry at the end fails too), up for attempt 2: the
    checkpoint carries attempt 1's backlog, attempt 2 logs it first, and the run holds every step once."""
    from mlflow.tracking import MlflowClient

    port = free_port()
    integrations = [{"type": "mlflow", "mlflow": {"tracking_uri": f"http://127.0.0.1:{port}"}}]
    hp: dict[str, Any] = {"max_steps": 4, "batch_size": 4, "checkpoint_every": 2}
    flag = StopFlag()
    flag.stop_at_step = 2
    first = ListReporter()
    request = _request(tiny_model_dir, demo_files, tmp_path / "a1", integrations, "ftjob-backlog", **hp)
    assert train(request, first, flag) == EXIT_STOPPED
    warnings = [r.message or "" for r in first.reports if r.level == "warn"]
    assert len(warnings) == 2 and "failed again at the end" in warnings[1], warnings
    assert "up to step 2 travels with that checkpoint" in warnings[1], warnings
    (checkpoint,) = [c for c in first.of_kind("checkpoint") if c.step == 2]
    saved = json.loads((Path(str(checkpoint.path)) / RUN_IDS_FILE).read_text())
    assert "mlflow" not in saved and saved["pending"]["mlflow"][0]["op"] == "params"

    with start_mlflow_server(tmp_path / "mlflow", port) as url:
        second = ListReporter()
        request = _request(tiny_model_dir, demo_files, tmp_path / "a2", integrations, "ftjob-backlog", **hp)
        request.attempt, request.resume_from = 2, checkpoint.path
        assert train(request, second) == EXIT_OK
        assert not [r for r in second.reports if r.level == "warn"], second.reports
        recovered = [r.message or "" for r in second.of_kind("event") if "recovered" in (r.message or "")]
        assert len(recovered) == 1 and "an earlier attempt could not log" in recovered[0], recovered

        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("ipo-align")
        assert experiment is not None
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED" and run.data.tags["ipo.attempt"] == "2"
        reported = _reported(first, second)
        assert sorted(reported["train_loss"]) == [1, 2, 3, 4]
        for key in (*LOGGED, *LOGGED_VALID, "tokens_per_second"):
            _same_history(mlflow_history(client, run.info.run_id, key), reported[key], key)


def test_a_worker_does_not_contact_a_tracking_uri_outside_its_allow_list(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    from worker.training.trackers import TrackingReporter, tracking_reporter

    integrations = [
        {"type": "mlflow", "mlflow": {"tracking_uri": "http://10.0.0.7:5000"}},
        {"type": "mlflow", "mlflow": {"tracking_uri": "http://127.0.0.1:5000"}},
    ]
    request = _request(tiny_model_dir, demo_files, tmp_path / "run", integrations)
    assert request.mlflow_allowed_uris == ["http://127.0.0.1", "http://localhost", "http://[::1]"]  # the default
    inner = ListReporter()
    wrapped = tracking_reporter(request, inner)
    assert isinstance(wrapped, TrackingReporter)
    assert [s.tracker.config.tracking_uri for s in wrapped.sinks] == ["http://127.0.0.1:5000"]  # type: ignore[attr-defined]
    (warning,) = inner.reports
    assert warning.level == "warn" and "'http://10.0.0.7:5000' is not allowed on this worker" in (warning.message or "")

    request.mlflow_allowed_uris = ["http://10.0.0.7:5000", "http://127.0.0.1"]  # as the worker's setting says
    inner = ListReporter()
    wrapped = tracking_reporter(request, inner)
    assert isinstance(wrapped, TrackingReporter) and [s.key for s in wrapped.sinks] == ["mlflow", "mlflow-2"]
    assert not inner.reports
