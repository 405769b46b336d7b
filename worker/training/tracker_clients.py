"""The tracker clients behind a job's ``integrations``: an MLflow run (``MlflowTracker``, through
``MlflowClient``) and a Weights & Biases run (``WandbTracker``, through ``wandb.init``), each behind the small
``Tracker`` interface. What is logged when, resumes, backlogs and failures are ``trackers.py``'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from contracts.integrations import MlflowIntegration, WandbIntegration
from worker.training.request import TrainRequest

DEFAULT_EXPERIMENT = "ipo-align"
"""The MLflow experiment when neither the job nor the worker's ``MLFLOW_EXPERIMENT_NAME`` names one."""
MLFLOW_PARAM_MAX = 6000
"""MLflow's longest param value (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``)."""
MLFLOW_BATCH_PARAMS = 100
"""Most params one ``log_batch`` takes (``mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH``)."""
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
"""Set in the trainer child unless the worker's environment sets them: MLflow's own defaults (7 retries
with exponential backoff, 120 s timeout) would hold a step for minutes on a server that is down."""
WANDB_INIT_TIMEOUT = 30.0
"""Seconds ``wandb.init`` may take before the tracker counts as down (W&B's default: 90), unless the worker's
environment sets W&B's own ``WANDB_INIT_TIMEOUT``."""


class Tracker:
    """One tracker's run. Subclasses implement the operations; any of them may raise on a tracker that is
    down (``TrackingReporter`` catches, keeps and replays)."""

    kind = ""

    def start(self, run_id: str | None) -> str:
        """Open (``run_id``: continue) the run; returns its id."""
        raise NotImplementedError

    def params(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def metrics(self, step: int, values: dict[str, float], timestamp: float) -> None:
        raise NotImplementedError

    def artifact(self, name: str, path: str) -> None:
        raise NotImplementedError

    def finish(self, succeeded: bool) -> None:
        """End the run (``FINISHED`` when ``succeeded``, else ``KILLED``: paused, stopped or failed)."""
        raise NotImplementedError


class MlflowTracker(Tracker):
    """MLflow through ``MlflowClient`` (explicit tracking URI, no global state)."""

    kind = "mlflow"

    def __init__(self, config: MlflowIntegration, request: TrainRequest, tags: dict[str, str]) -> None:
        self.config = config
        self.request = request
        self.tags = {**tags, **(config.tags or {})}
        self.run_id: str | None = None
        self._client: Any = None
        self._artifacts: dict[str, str] = {}
        self._logged: set[tuple[str, int, float]] = set()
        """``(key, step, value)`` the run already holds: logging them again is skipped (a replay)."""

    def _connect(self) -> Any:
        from mlflow.tracking import MlflowClient

        uri = self.config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return self._client

    def start(self, run_id: str | None) -> str:
        from mlflow.entities import RunStatus

        client = self._connect()
        name = self.config.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
        if run_id is None:
            found = client.search_runs(
                [experiment_id], filter_string=f"tags.`ipo.job_id` = '{self.request.job_id}'", max_results=1
            )
            run_id = found[0].info.run_id if found else None
        if run_id is None:
            run = client.create_run(experiment_id, run_name=self.config.run_name or self.request.job_id)
            run_id = run.info.run_id
        else:
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self._logged = {
                (key, m.step, m.value)
                for key in client.get_run(run_id).data.metrics
                for m in client.get_metric_history(run_id, key)
            }
        self.run_id = str(run_id)
        for key, value in self.tags.items():
            client.set_tag(self.run_id, key, value)
        return self.run_id

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        logged = self._client.get_run(self.run_id).data.params  # a resumed run has them: params are write-once
        batch = [Param(k, _text(v)[:MLFLOW_PARAM_MAX]) for k, v in params.items() if k not in logged]
        for start in range(0, len(batch), MLFLOW_BATCH_PARAMS):
            self._client.log_batch(self.run_id, params=batch[start : start + MLFLOW_BATCH_PARAMS])

    def metrics(self, step: int, values: dict[str, float], timestamp: float) -> None:
        from mlflow.entities import Metric

        ms = int(timestamp * 1000)
        batch = [Metric(k, v, ms, step) for k, v in values.items() if (k, step, v) not in self._logged]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)
        self._logged.update((m.key, step, m.value) for m in batch)

    def artifact(self, name: str, path: str) -> None:
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, path, artifact_path=name)
        else:
            self._client.log_artifact(self.run_id, path, artifact_path=name)
        self._artifacts[name] = path

    def finish(self, succeeded: bool) -> None:
        if succeeded and self.config.register_model_as and "adapter" in self._artifacts:
            self._register(self.config.register_model_as)
        self._client.set_terminated(self.run_id, status="FINISHED" if succeeded else "KILLED")

    def _register(self, name: str) -> None:
        """A new version of registered model ``name`` from the run's ``adapter`` artifacts, tagged with the
        base model and the job (created with the model when it does not exist yet)."""
        from mlflow.exceptions import MlflowException

        client = self._client
        base = self.tags.get("ipo.base_model", "")
        try:
            client.create_registered_model(name, description="LoRA adapters trained by ipo-align")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(self.run_id).info.artifact_uri}/adapter"
        client.create_model_version(
            name,
            source,
            run_id=self.run_id,
            tags={"base_model": base, "ipo.job_id": self.request.job_id, "ipo.adapter": "peft-lora"},
            description=f"LoRA adapter for base model {base}, fine-tuning job {self.request.job_id}",
        )


class WandbTracker(Tracker):
    """Weights & Biases through ``wandb.init`` / ``Run.log`` (``WANDB_MODE=offline`` writes the run locally)."""

    kind = "wandb"

    def __init__(self, config: WandbIntegration, request: TrainRequest, tags: dict[str, str]) -> None:
        self.config = config
        self.request = request
        self.tags = tags
        self._run: Any = None

    def start(self, run_id: str | None) -> str:
        import wandb

        run_id = run_id or wandb_run_id(self.request.job_id)
        self._run = wandb.init(
            project=self.config.project,
            entity=self.config.entity,
            name=self.config.name or self.request.job_id,
            id=run_id,
            resume="allow",
            tags=[*(self.config.tags or []), self.request.job_id],
            dir=os.environ.get("WANDB_DIR") or self.request.output_dir,
            reinit="create_new",
            settings=wandb.Settings(
                init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT") or WANDB_INIT_TIMEOUT),
                console="off",
                save_code=False,
            ),
        )
        self._run.summary.update({k: v for k, v in self.tags.items()})
        self._run.config.update({"ipo": self.tags}, allow_val_change=True)
        return str(self._run.id)

    def params(self, params: dict[str, Any]) -> None:
        self._run.config.update(params, allow_val_change=True)

    def metrics(self, step: int, values: dict[str, float], timestamp: float) -> None:
        self._run.log(values, step=step)

    def artifact(self, name: str, path: str) -> None:
        import wandb

        kind = "model" if name == "adapter" else "result"
        artifact = wandb.Artifact(f"{self.request.job_id}-{name}", type=kind, metadata=self.tags)
        if Path(path).is_dir():
            artifact.add_dir(path)
        else:
            artifact.add_file(path)
        self._run.log_artifact(artifact)

    def finish(self, succeeded: bool) -> None:
        self._run.finish(exit_code=0 if succeeded else 1)


def wandb_run_id(job_id: str) -> str:
    """The job's W&B run id (W&B ids: letters, digits, ``-`` and ``_``): the job id itself."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in job_id)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
