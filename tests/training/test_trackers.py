"""A job's integrations on real trackers: a real MLflow tracking server (SQLite backend, local artifact
store, started here on a free loopback port) and W&B in offline mode (its run file read back). Each run
is compared with what the job itself reported (the reports that become its metrics events)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contracts.integrations import parse_integrations
from contracts.method import Method
from ipo_cli.processes import free_port, stop_group, wait_http_ok
from worker.training.callbacks import StopFlag
from worker.training.reporter import ListReporter
from worker.training.request import EXIT_OK, EXIT_STOPPED, TrainRequest
from worker.training.run import train
from worker.training.trackers import RUN_IDS_FILE

mlflow = pytest.importorskip("mlflow")  # the worker's optional extra `tracking` (in `make venv`)
wandb = pytest.importorskip("wandb")

LOGGED = ("train_loss", "ipo_margin", "ipo_margin_target", "preference_accuracy", "learning_rate")
LOGGED_VALID = ("valid_loss", "valid_preference_accuracy", "valid_ipo_margin")


def _request(model: Path, data: tuple[Path, Path], out: Path, integrations: list[Any], **hp: Any) -> TrainRequest:
    return TrainRequest(
        job_id="ftjob-track1",
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


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    try:
        wait_http_ok(f"{url}/health", [proc], timeout=120)
        yield url
    finally:
        stop_group(proc)
        log.close()


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
    hp = {"max_steps": 4, "batch_size": 4, "checkpoint_every": 2, "beta": 0.5}
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
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx(reported[key]), key  # same steps, same values

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
    deadline = time.monotonic() + 120
    while True:  # wandb-core (its own process) may still be writing the last records when finish() returns
        history, config, run = _read_wandb(run_file)
        if run.get("exited") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert run["run_id"] == "ftjob-track1" and run["display_name"] == "tiny run" and "ci" in run["tags"]
    reported = _reported(reporter)
    for key in (*LOGGED, *LOGGED_VALID, "tokens_per_second"):
        logged = {int(row["_step"]): row[key] for row in history if key in row}
        assert logged == pytest.approx(reported[key]), (key, logged, reported[key], history)
    resolved = reporter.of_kind("resolved")[0].data or {}
    assert config["beta"] == resolved["beta"] and config["total_steps"] == 3
    assert config["ipo"]["ipo.job_id"] == "ftjob-track1"


def _read_wandb(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """History rows, the final config and the run record of an offline W&B run file."""
    from wandb.proto import wandb_internal_pb2

    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    run: dict[str, Any] = {}
    for data in _wandb_records(path):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            config.update({_key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            run = {"run_id": record.run.run_id, "display_name": record.run.display_name, "tags": list(record.run.tags)}
            config.update({_key(item): json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "exit":
            run["exited"] = True
    return history, config, run


def _key(item: Any) -> str:
    return str(item.key or "/".join(item.nested_key))


WANDB_BLOCK = 32768
"""A ``.wandb`` file is a LevelDB-style log (W&B's ``core/pkg/leveldb``): a 7-byte header (``:W&B``, magic
0xBEE1, version), then 32 KiB blocks of records, each ``crc32 (4) | length (2) | type (1) | payload``;
types 1 full, 2 first, 3 middle, 4 last chunk of a record; a block's tail under 7 bytes is padding."""


def _wandb_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero fill at the end of a block or the file
            pos += WANDB_BLOCK - pos % WANDB_BLOCK if pos % WANDB_BLOCK else 0
            continue
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload


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
