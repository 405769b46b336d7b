"""A job's integrations on the live stack: ``ipo serve`` + a real Celery worker train the tiny model with
three trackers (a real MLflow server, W&B in offline mode, and an MLflow URL where nothing listens), paused
mid-run and resumed. What each tracker holds is read back and compared, name by name and step by step,
with the job's own metrics events (what the dashboard charts); params with the resolved hyperparameters;
tags with the job, attempt and lineage; artifacts with the job's result files."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from ipo_cli.processes import free_port
from tests.conftest import fresh_database
from tests.e2e.conftest import Stack, _stack
from tests.tracking_readback import mlflow_history, mlflow_server, read_wandb
from worker.training.demo_data import write_demo_data

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
mlflow = pytest.importorskip("mlflow")  # the worker's optional extra `tracking` (in `make venv`)
wandb = pytest.importorskip("wandb")

T = TypeVar("T")
NOT_METRICS = ("step", "total_steps")
"""Numbers of a metrics event that are its coordinates, not metrics (the trackers' step and a param)."""


@pytest.fixture(scope="module")
def wandb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wandb")


@pytest.fixture(scope="module")
def stack(
    redis_url: str | None,
    queue_name: str,
    tiny_models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    wandb_dir: Path,
) -> Iterator[Stack]:
    """The e2e stack with the worker's W&B set to offline runs under ``wandb_dir`` (no account, no network)."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    with fresh_database(tmp_path_factory.mktemp("db"), "ipo_e2e_trackers") as database_url:
        yield from _stack(database_url, redis_url, queue_name, tiny_models_dir, tmp_path_factory, env)


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


def _wait(what: str, check: Callable[[], T | None], timeout: float = 1500) -> T:
    deadline = time.monotonic() + timeout
    while (value := check()) is None or value is False:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(1)  # well under the API key's rate limit (IPO_RATE_LIMIT_PER_MINUTE)
    return value


def _events(http: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """All of the job's events, oldest first (the API pages newest first)."""
    out: list[dict[str, Any]] = []
    after = None
    while True:
        r = http.get(
            f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100, **({"after": after} if after else {})}
        )
        assert r.status_code == 200, r.text
        page = r.json()
        out.extend(page["data"])
        if not page["has_more"]:
            return sorted(out, key=lambda e: int(e["id"].removeprefix("ftevent-")))
        after = page["data"][-1]["id"]


def _dashboard(events: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` as the dashboard charts the metrics events: every number but the step
    and total, a step reported again overwriting the earlier report (app/dashboard/static/job.js)."""
    out: dict[str, dict[int, float]] = {}
    for event in events:
        if event["type"] != "metrics":
            continue
        data = event["data"]
        for key, value in data.items():
            if key not in NOT_METRICS and isinstance(value, int | float) and not isinstance(value, bool):
                out.setdefault(key, {})[int(data["step"])] = float(value)
    return out


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@pytest.mark.timeout(1800)  # two attempts of real training: a busy shared machine needs far more than 15 min
def test_trackers_hold_what_the_dashboard_shows_across_a_pause_and_a_tracker_that_is_down(
    stack: Stack, mlflow_url: str, wandb_dir: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    http = httpx.Client(base_url=stack.url, headers=stack.headers, timeout=30)
    train, valid = write_demo_data(tmp_path / "data", n_train=64, n_valid=8, seed=1)
    file_ids = []
    for path in (train, valid):
        with path.open("rb") as fh:
            r = http.post("/v1/files", files={"file": (path.name, fh)}, data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        file_ids.append(r.json()["id"])
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there, for the whole job
    integrations = [
        {
            "type": "mlflow",
            "mlflow": {
                "tracking_uri": mlflow_url,
                "experiment_name": "e2e",
                "tags": {"team": "nlp"},
                "register_model_as": "e2e-adapter",
            },
        },
        {"type": "wandb", "wandb": {"project": "e2e", "name": "e2e run", "tags": ["e2e"]}},
        {"type": "mlflow", "mlflow": {"tracking_uri": down}},
    ]
    total = 12
    body = {
        "model": "tiny-mistral",
        "training_file": file_ids[0],
        "validation_file": file_ids[1],
        "seed": 3,
        # Whole-dataset batches (~2 steps/s on the tiny model) so that the pause lands mid-run; only the
        # pause writes a checkpoint.
        "method": {
            "type": "ipo",
            "ipo": {"hyperparameters": {"max_steps": total, "batch_size": 64, "beta": 0.1, "checkpoint_every": 100}},
        },
        "integrations": integrations,
    }
    r = http.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]

    _wait("step 2", lambda: (http.get(f"/v1/fine_tuning/jobs/{job_id}").json().get("step") or 0) >= 2)
    r = http.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert r.status_code == 200, r.text
    _wait("the pause", lambda: any(e["message"].startswith("Job paused") for e in _events(http, job_id)))
    (checkpoint,) = http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    pause_step = checkpoint["step_number"]
    assert 2 <= pause_step < total, "the pause landed mid-run"
    r = http.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    assert r.status_code == 200, r.text
    job = _wait(
        "the end",
        lambda: (j := http.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and j,
    )
    log_tail = (stack.logs / "worker.log").read_text(errors="replace")[-4000:]
    assert job["status"] == "succeeded", (job, log_tail)  # a tracker that is down never fails the training

    events = _events(http, job_id)
    dashboard = _dashboard(events)
    train_steps = [e["data"]["step"] for e in events if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert train_steps == list(range(1, total + 1)), train_steps  # the job itself: every step once
    assert {
        "train_loss",
        "ipo_margin",
        "ipo_margin_target",
        "preference_accuracy",
        "learning_rate",
        "tokens_per_second",
        "valid_loss",
        "valid_preference_accuracy",
    } <= set(dashboard)

    # The tracker that was down: warnings, each naming it; the others never warned.
    warnings = [e for e in events if e["level"] == "warn" and "integration" in (e.get("data") or {})]
    assert warnings and all(w["data"]["tracker"] == "mlflow-2" for w in warnings), warnings
    assert all(w["message"].startswith("mlflow-2 tracking failed") for w in warnings), warnings
    assert any("logged to it once more at the end" in w["message"] for w in warnings)
    assert any("failed again at the end" in w["message"] for w in warnings)

    # MLflow: one run for both attempts, every metric of the dashboard with the same steps and values.
    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name("e2e")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == job_id
    assert set(run.data.metrics) == set(dashboard)  # name by name
    for key, by_step in dashboard.items():
        points = mlflow_history(client, run_id, key)
        assert [s for s, _ in points] == sorted(by_step), (key, points)  # step by step, none twice
        assert [v for _, v in points] == pytest.approx([by_step[s] for s in sorted(by_step)]), key

    resolved = job["resolved_hyperparameters"]
    assert run.data.params == {k: _param_text(v) for k, v in resolved.items()}
    tags = run.data.tags
    assert tags["ipo.job_id"] == job_id and tags["ipo.attempt"] == "2" and tags["team"] == "nlp"
    assert tags["ipo.base_model"] == "tiny-mistral" and tags["ipo.method"] == "ipo"
    assert tags["ipo.training_file"] == file_ids[0] and tags["ipo.validation_file"] == file_ids[1]
    assert tags["ipo.resumed_from_checkpoint"] == checkpoint["id"]

    # Artifacts: the adapter and metrics.csv, the same bytes as the job's result files.
    adapter_file, *others = job["result_files"]
    adapter = zipfile.ZipFile(io.BytesIO(http.get(f"/v1/files/{adapter_file}/content").content))
    logged_adapter = {a.path.removeprefix("adapter/") for a in client.list_artifacts(run_id, "adapter")}
    assert logged_adapter == {n for n in adapter.namelist() if not n.endswith("/")}
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        local = Path(client.download_artifacts(run_id, f"adapter/{name}", str(tmp_path)))
        assert local.read_bytes() == adapter.read(name), name
    result_names = {http.get(f"/v1/files/{f}").json()["filename"]: f for f in others}
    (metrics_name,) = [n for n in result_names if n.endswith(".csv")]
    local = Path(client.download_artifacts(run_id, "metrics/metrics.csv", str(tmp_path)))
    assert local.read_bytes() == http.get(f"/v1/files/{result_names[metrics_name]}/content").content

    # The adapter is a registered model version, with the base model recorded.
    (version,) = client.search_model_versions("name='e2e-adapter'")
    assert version.run_id == run_id and version.version == "1"
    assert version.tags["base_model"] == "tiny-mistral" and version.tags["ipo.job_id"] == job_id
    assert str(version.source).endswith("/adapter")

    # W&B: one offline run file per attempt, both the same run; together they hold every step once.
    files = sorted(wandb_dir.glob(f"wandb/offline-run-*/run-{job_id}.wandb"))
    assert len(files) == 2, files
    runs = [read_wandb(f) for f in files]
    assert [run["run_id"] for _, _, run in runs] == [job_id, job_id]
    assert all(run["display_name"] == "e2e run" and "e2e" in run["tags"] for _, _, run in runs)
    assert [run.get("exit_code") for _, _, run in runs] == [1, 0]  # paused, then finished
    steps_by_file = [{int(row["_step"]) for row in history} for history, _, _ in runs]
    assert max(steps_by_file[0]) == pause_step and min(steps_by_file[1]) == pause_step + 1
    for key, by_step in dashboard.items():
        logged: dict[int, float] = {}
        for history, _, _ in runs:
            for row in history:
                if key in row:
                    assert int(row["_step"]) not in logged, (key, row["_step"])  # no step twice
                    logged[int(row["_step"])] = row[key]
        assert logged == pytest.approx(by_step), key
    config = runs[1][1]
    assert {k: config[k] for k in resolved} == resolved
    assert config["ipo"]["ipo.job_id"] == job_id and config["ipo"]["ipo.attempt"] == "2"
