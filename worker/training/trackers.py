"""Experiment trackers (a job's ``integrations``): the run logged to MLflow and Weights & Biases.

``tracking_reporter`` wraps the trainer's ``Reporter``: everything the service reports passes through it
on its way to the worker, and the same values go to each tracker, so a tracker shows exactly what the
job's events and dashboard show:

- ``resolved`` (the hyperparameters with every ``auto`` resolved) -> run params (W&B: the run config);
- ``metrics`` (train loss, IPO margin and its target, preference accuracy, learning rate, tokens/s,
  validation metrics, ...: every number of the report but ``step``/``total_steps``) -> metrics at the
  report's ``step``;
- ``artifact`` (the adapter directory, the metrics CSV) -> run artifacts;
- ``done`` -> the run ends ``FINISHED`` and, with ``mlflow.register_model_as``, the adapter becomes a new
  version of that registered model (tags: base model, job id).

The job id, attempt, base model, method and data files (the lineage) are run tags.

Why not transformers' ``report_to=["mlflow", "wandb"]`` (``MLflowCallback``/``WandbCallback``): they log
the trainer's raw log keys (``loss``, ``ipo/margin``), not the service's metrics (no margin target, no
tokens/s, validation under other names), cannot register a model, and an unreachable MLflow server
raises out of ``on_log`` and fails the training. The libraries' own client APIs are used instead.

A resumed attempt continues the same runs: their ids are written into every checkpoint directory
(``trackers.json``, uploaded and restored with it); an attempt without one looks the MLflow run up by its
``ipo.job_id`` tag, and the W&B run id is derived from the job id. Steps continue: an attempt resumed
from step N reports N+1 onwards, and an MLflow value the run already holds (same key, step and value, as
a replay logs) is not logged twice. An attempt killed after its last checkpoint has reported steps the
next attempt reports again (the dashboard keeps the newer value): MLflow then holds both values of those
steps, the newer one last; a W&B server keeps the first (it drops steps a run has seen).

A tracker that fails (down, refused, misconfigured) never fails the training: the job gets one warning
event, what was to be logged is kept in memory, and the whole run is replayed once at the end; if that
fails too, a second warning says so (the job's own events still hold every metric). An attempt that ends
with a tracker still down (paused, stopped) writes what it could not log into its checkpoints
(``trackers.json``, ``pending``): the attempt that resumes logs that backlog first.

A job's ``mlflow.tracking_uri`` is contacted only when the worker's ``IPO_MLFLOW_ALLOWED_URIS`` allows it
(``TrainRequest.mlflow_allowed_uris``; the API refuses other jobs at creation already).

Credentials come from the worker's environment, inherited by the trainer child: ``WANDB_API_KEY``
(``WANDB_BASE_URL`` for a self-hosted server), ``MLFLOW_TRACKING_TOKEN`` or
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from contracts.integrations import MlflowBlock, tracking_uri_allowed
from worker.training.reporter import Level, Reporter
from worker.training.request import TrainRequest
from worker.training.tracker_clients import MLFLOW_HTTP_DEFAULTS, MlflowTracker, Tracker, WandbTracker

log = logging.getLogger(__name__)

RUN_IDS_FILE = "trackers.json"
"""In each checkpoint directory: ``{"mlflow": run_id, "wandb": run_id, "pending": {"mlflow": [op, ...]}}``:
the runs this job logs to, and what a tracker that was down could not log yet (params, and metrics up to
the checkpoint's step; each op ``{"op": "metrics", "args": [step, {name: value}, unix_seconds]}``)."""
Op = tuple[str, tuple[Any, ...]]


class _Sink:
    """One tracker and what it could not log yet. ``key`` names it in ``trackers.json`` and in events: its
    kind (``mlflow``), or ``mlflow-2`` for a job's second tracker of that kind."""

    def __init__(self, tracker: Tracker, key: str) -> None:
        self.tracker = tracker
        self.key = key
        self.run_id: str | None = None
        self.started = False
        self.down: str | None = None
        """Why the tracker failed (None: working)."""
        self.ops: list[Op] = []
        """Every operation so far, in order: replayed on a fresh start when the tracker was down."""
        self.backlog: list[Op] = []
        """What an earlier attempt could not log (``trackers.json``): logged first once the run starts."""
        self.carried_to_step: int | None = None
        """The step of the last checkpoint that carries what this tracker could not log (``pending``)."""


class TrackingReporter:
    """A ``Reporter`` that passes every report on to ``inner`` and logs it to the trackers too.

    Call :meth:`close` once training is over (``train()`` does, whatever the outcome)."""

    def __init__(self, inner: Reporter, trackers: list[Tracker], resume_from: str | None = None) -> None:
        self.inner = inner
        self.sinks: list[_Sink] = []
        for tracker in trackers:
            same = sum(1 for s in self.sinks if s.tracker.kind == tracker.kind)
            self.sinks.append(_Sink(tracker, tracker.kind if not same else f"{tracker.kind}-{same + 1}"))
        saved = _read_saved(resume_from)
        for sink in self.sinks:
            sink.run_id = saved.run_ids.get(sink.key)
            sink.backlog = saved.pending.get(sink.key, [])
            sink.ops = list(sink.backlog)
        self.closed = False

    # ---- the Reporter protocol ----

    def event(self, message: str, level: Level = "info", data: dict[str, Any] | None = None) -> None:
        self.inner.event(message, level, data)

    def metrics(self, data: dict[str, Any]) -> None:
        self.inner.metrics(data)
        step = data.get("step")
        values = {k: float(v) for k, v in data.items() if k not in ("step", "total_steps") and _is_number(v)}
        if isinstance(step, int) and values:
            self._each("metrics", step, values, time.time())

    def resolved(self, hparams: dict[str, Any]) -> None:
        self.inner.resolved(hparams)
        self._each("params", hparams)

    def checkpoint(self, step: int, path: str, metrics: dict[str, Any] | None = None) -> None:
        saved: dict[str, Any] = {s.key: s.run_id for s in self.sinks if s.run_id}
        pending = {s.key: _portable(s.ops, step) for s in self.sinks if s.down is not None or s.backlog}
        if pending:
            saved["pending"] = pending
        for sink in self.sinks:
            sink.carried_to_step = step if sink.key in pending else None
        if saved:  # before the report: the worker zips the directory once it hears of it
            (Path(path) / RUN_IDS_FILE).write_text(json.dumps(saved), encoding="utf-8")
        self.inner.checkpoint(step, path, metrics)

    def artifact(self, name: str, path: str) -> None:
        self._each("artifact", name, path)
        self.inner.artifact(name, path)

    def done(self, trained_tokens: int) -> None:
        self.close(succeeded=True)
        self.inner.done(trained_tokens)

    def error(self, code: str, message: str) -> None:
        self.close(succeeded=False)  # its warnings go before the error, the attempt's last report
        self.inner.error(code, message)

    # ---- tracking ----

    def close(self, succeeded: bool) -> None:
        """End every run; a tracker that was down gets one more try (start, replay, end) first."""
        if self.closed:
            return
        self.closed = True
        for sink in self.sinks:
            if sink.down is not None:
                self._retry(sink, succeeded)
            elif sink.started:
                self._call(sink, "finish", (succeeded,))

    def _each(self, name: str, *args: Any) -> None:
        for sink in self.sinks:
            sink.ops.append((name, args))
            if sink.down is None:
                self._call(sink, name, args)

    def _call(self, sink: _Sink, name: str, args: tuple[Any, ...]) -> None:
        try:
            self._ensure_started(sink)
            getattr(sink.tracker, name)(*args)
        except Exception as exc:  # a tracker must never fail the training
            sink.down = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("%s tracking failed: %s", sink.key, sink.down, exc_info=True)
            self.inner.event(
                f"{sink.key} tracking failed ({sink.down}); training continues, and the run is "
                "logged to it once more at the end.",
                level="warn",
                data={"integration": sink.tracker.kind, "tracker": sink.key},
            )

    def _ensure_started(self, sink: _Sink) -> None:
        if not sink.started:
            sink.run_id = sink.tracker.start(sink.run_id)
            sink.started = True
            if sink.backlog:
                for name, args in sink.backlog:
                    getattr(sink.tracker, name)(*args)
                self.inner.event(
                    f"{sink.key} tracking recovered: {len(sink.backlog)} reports an earlier attempt could "
                    f"not log were logged (run {sink.run_id}).",
                    data={"integration": sink.tracker.kind, "tracker": sink.key},
                )
                sink.backlog = []

    def _retry(self, sink: _Sink, succeeded: bool) -> None:
        try:
            sink.started = False
            sink.backlog = []  # part of ``ops``, replayed below
            self._ensure_started(sink)
            for name, args in sink.ops:
                getattr(sink.tracker, name)(*args)
            sink.tracker.finish(succeeded)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("%s tracking failed again at the end: %s", sink.key, reason, exc_info=True)
            carried = (
                f"what it could not log up to step {sink.carried_to_step} travels with that checkpoint and is "
                "logged when the job resumes"
                if sink.carried_to_step is not None and not succeeded
                else "the run is incomplete there"
            )
            self.inner.event(
                f"{sink.key} tracking failed again at the end ({reason}); {carried}. The job's own events and "
                "metrics are complete.",
                level="warn",
                data={"integration": sink.tracker.kind, "tracker": sink.key},
            )
        else:
            self.inner.event(
                f"{sink.key} tracking recovered: the run was logged at the end (run {sink.run_id}).",
                data={"integration": sink.tracker.kind, "tracker": sink.key},
            )


class _Saved:
    """What a checkpoint's ``trackers.json`` says: run ids by tracker, and what could not be logged yet."""

    def __init__(self, run_ids: dict[str, str], pending: dict[str, list[Op]]) -> None:
        self.run_ids = run_ids
        self.pending = pending


def _read_saved(checkpoint: str | None) -> _Saved:
    """``trackers.json`` of ``checkpoint``; empty when there is none or it cannot be read (the runs are then
    found by their ``ipo.job_id`` tag / job id, and only the backlog is lost)."""
    if not checkpoint:
        return _Saved({}, {})
    try:
        data = json.loads((Path(checkpoint) / RUN_IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _Saved({}, {})
    if not isinstance(data, dict):
        return _Saved({}, {})
    ids = {str(k): str(v) for k, v in data.items() if isinstance(v, str)}
    pending: dict[str, list[Op]] = {}
    for kind, ops in (data.get("pending") or {}).items():
        try:
            pending[str(kind)] = [_op_from_json(op) for op in ops]
        except (TypeError, ValueError, KeyError):
            log.warning("unreadable %s backlog in %s; left out", kind, checkpoint)
    return _Saved(ids, pending)


def _portable(ops: list[Op], step: int) -> list[dict[str, Any]]:
    """``ops`` as JSON for ``trackers.json``: params, and metrics up to ``step`` (the attempt that resumes
    from this checkpoint reports the later steps itself). Artifacts are left out: they are this attempt's
    files, and the attempt that finishes reports its own."""
    out: list[dict[str, Any]] = []
    for name, args in ops:
        if name == "params" or (name == "metrics" and args[0] <= step):
            out.append({"op": name, "args": list(args)})
    return out


def _op_from_json(op: dict[str, Any]) -> Op:
    name, args = op["op"], op["args"]
    if name == "params" and isinstance(args[0], dict):
        return name, (args[0],)
    if name == "metrics":
        return name, (int(args[0]), {str(k): float(v) for k, v in args[1].items()}, float(args[2]))
    raise ValueError(f"unknown tracker operation {name!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def run_tags(request: TrainRequest) -> dict[str, str]:
    """The job id, attempt and lineage (base model, method, data files, resumed checkpoint) as tags."""
    tags = {
        "ipo.job_id": request.job_id,
        "ipo.attempt": str(request.attempt),
        "ipo.base_model": Path(request.model_path).name,
        "ipo.method": request.method.type,
    }
    tags.update({f"ipo.{k}": v for k, v in request.lineage.items()})
    return tags


def tracking_reporter(request: TrainRequest, reporter: Reporter) -> Reporter | TrackingReporter:
    """``reporter`` itself when the job has no integrations, else a ``TrackingReporter`` around it.

    A tracker whose library is not installed (the worker's optional extra ``tracking``) is reported as a
    warning event and left out; training goes on."""
    if not request.integrations:
        return reporter
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    tags = run_tags(request)
    trackers: list[Tracker] = []
    for block in request.integrations:
        try:
            __import__(block.type)
        except ImportError:
            reporter.event(
                f"{block.type} tracking is not installed on this worker (pip install 'ipo-align[tracking]'); "
                "the run is not logged there.",
                level="warn",
                data={"integration": block.type},
            )
            continue
        uri = block.mlflow.tracking_uri if isinstance(block, MlflowBlock) else None
        if uri is not None and not tracking_uri_allowed(uri, request.mlflow_allowed_uris):
            reporter.event(
                f"mlflow tracking_uri {uri!r} is not allowed on this worker (IPO_MLFLOW_ALLOWED_URIS); "
                "the run is not logged there.",
                level="warn",
                data={"integration": block.type},
            )
            continue
        trackers.append(
            MlflowTracker(block.mlflow, request, tags)
            if isinstance(block, MlflowBlock)
            else WandbTracker(block.wandb, request, tags)
        )
    return TrackingReporter(reporter, trackers, request.resume_from) if trackers else reporter
