"""Metrics, checkpoint and stop plumbing around TRL's ``DPOTrainer`` (``trainer.IpoDPOTrainer``) and
``SFTTrainer`` (``sft.py``).

- ``ReportingCallback`` turns each logging step into a ``metrics`` report (with the peak GPU memory on
  CUDA and the process's peak RSS), and each completed save into a ``checkpoint`` report (after renaming
  ``checkpoint-N`` to ``step-N``: the rename is atomic, so a ``step-N`` directory is always complete).
- ``StopCallback`` stops at the next step end when a signal handler set the ``StopFlag``; on pause it
  saves a checkpoint first.
- Divergence (see :func:`divergence`): ``ReportingCallback`` checks every logged training loss and
  gradient norm, ``NonFiniteGuard`` the weights after every step; either stops the run before that
  step's checkpoint is written, so the last checkpoint reported is the last good one.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from contracts.internal import StopReason
from worker.training.distributed import agree_on_stop, barrier
from worker.training.reporter import Reporter

LOSS_EXPLOSION_FACTOR = 100.0
"""A logged training loss above this many times the run's first logged loss (or 1.0, whichever is larger)
is a divergence. The first loss is a known scale: the adapter starts as the identity (PEFT initialises
LoRA's B to zero), so IPO's first loss is ``(1/(2*beta))**2`` and the sigmoid loss's is ``ln 2``. 100 times
that means IPO's margin is ten targets away from its target, or a sigmoid margin of -100 nats: no healthy
run gets there, while ordinary batch-to-batch noise stays within a factor of a few."""

GRAD_NORM_EXPLOSION_FACTOR = 1e4
"""A logged gradient norm (before clipping) above this many times the first logged one (or 1.0, the
``max_grad_norm`` transformers clips to, whichever is larger) is a divergence. Gradient norms of a healthy
LoRA run grow while the adapter leaves zero and spike by 10-100x on odd batches; four orders of magnitude
are an exploding run (the lr 1.0 runs of ``tests/training`` reach 1e5-1e6 times their first norm)."""

EXPLOSION_FLOOR = 1.0
"""The smallest reference loss / gradient norm the factors apply to, so a run that starts near zero is
not called diverged for a loss of 0.01."""


class Divergence(NamedTuple):
    reason: str
    """What diverged, for the job's error message: ``the loss exploded to 2.5e+13, more than ...``."""
    non_finite: bool
    """True when a value became NaN/inf (error code ``nan_loss``), False when it exploded (``diverged``)."""


def divergence(
    loss: float | None, grad_norm: float | None, first_loss: float | None, first_grad_norm: float | None
) -> Divergence | None:
    """Why a logged training step counts as diverged, or None when it does not.

    ``loss`` and ``grad_norm`` are the step's logged values (the mean loss since the previous log, and the
    gradient norm before clipping); ``first_*`` are the run's first logged ones (None: not known yet, only
    the non-finite check applies). Thresholds: :data:`LOSS_EXPLOSION_FACTOR`,
    :data:`GRAD_NORM_EXPLOSION_FACTOR`, :data:`EXPLOSION_FLOOR`.
    """
    for name, value in (("loss", loss), ("gradient norm", grad_norm)):
        if value is not None and not math.isfinite(value):
            return Divergence(f"the {name} became {value}", non_finite=True)
    checks = (
        ("loss", loss, first_loss, LOSS_EXPLOSION_FACTOR),
        ("gradient norm", grad_norm, first_grad_norm, GRAD_NORM_EXPLOSION_FACTOR),
    )
    for name, value, first, factor in checks:
        if value is None or first is None or not math.isfinite(first):
            continue
        limit = factor * max(abs(first), EXPLOSION_FLOOR)
        if abs(value) > limit:
            reason = f"the {name} exploded to {value:.4g}, more than {factor:g} times its first value ({first:.4g})"
            return Divergence(reason, non_finite=False)
    return None


class StopFlag:
    """Set from signal handlers (SIGUSR1 = ``paused``, SIGTERM = ``cancelled``) or directly (tests)."""

    def __init__(self) -> None:
        self.reason: StopReason | None = None
        self.stop_at_step: int | None = None
        """Tests: request a pause once this optimiser step has completed."""

    def request(self, reason: StopReason) -> None:
        if self.reason != "cancelled":  # cancel wins over pause
            self.reason = reason

    def install_signal_handlers(self) -> None:
        def on_pause(signum: int, frame: FrameType | None) -> None:
            self.request("paused")

        def on_cancel(signum: int, frame: FrameType | None) -> None:
            self.request("cancelled")

        signal.signal(signal.SIGUSR1, on_pause)
        signal.signal(signal.SIGTERM, on_cancel)


class ReportingCallback(TrainerCallback):
    """Reports ``metrics`` at every logging step and ``checkpoint`` after every completed save."""

    def __init__(self, reporter: Reporter, *, total_steps: int, beta: float, loss_type: str) -> None:
        self.reporter = reporter
        self.total_steps = total_steps
        self.target_margin = 1.0 / (2.0 * beta) if loss_type == "ipo" else None
        self.supervised = loss_type == "sft"
        """SFT runs report TRL's ``mean_token_accuracy`` instead of the preference metrics."""
        self.rows: list[dict[str, Any]] = []
        """Every metrics report (train and valid), for the metrics CSV."""
        self.last_train: dict[str, Any] = {}
        self.diverged_step: int | None = None
        """First step whose loss, gradient norm or weights diverged (training stops there)."""
        self.diverged_reason: str | None = None
        """What diverged, for the job's error (``divergence``'s answer, or the weights' check)."""
        self.diverged_non_finite = False
        """Whether something became NaN/inf (``nan_loss``), not just exploded (``diverged``)."""
        self.last_checkpoint_step: int | None = None
        self.trained_tokens = 0
        self._start: tuple[float, int] | None = None
        self._last: tuple[float, int] | None = None
        self._on_cuda = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._on_cuda = args.device.type == "cuda"
        now = time.monotonic()
        self._start = (now, state.global_step)
        self._last = (now, self.trained_tokens)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        if not logs:
            return
        if any(k.startswith("eval_") for k in logs):
            self._report_eval(state, logs)
        elif "loss" in logs:
            self._report_train(state, control, logs)

    def _report_train(self, state: TrainerState, control: TrainerControl, logs: dict[str, float]) -> None:
        now = time.monotonic()
        tokens = int(logs.get("num_tokens", 0)) + self._tokens_before_resume(state)
        last_time, last_tokens = self._last or (now, tokens)
        start_time, start_step = self._start or (now, 0)
        done_steps = max(1, state.global_step - start_step)
        data: dict[str, Any] = {
            "step": state.global_step,
            "total_steps": self.total_steps,
            "epoch": round(float(logs.get("epoch", state.epoch or 0.0)), 4),
            "train_loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_second": round((tokens - last_tokens) / max(now - last_time, 1e-6), 1),
            "eta_seconds": round((now - start_time) / done_steps * max(0, self.total_steps - state.global_step), 1),
            **(
                {"token_accuracy": logs.get("mean_token_accuracy")}
                if self.supervised
                else {
                    "ipo_margin": logs.get("ipo/margin"),
                    "ipo_margin_target": self.target_margin,
                    "preference_accuracy": logs.get("ipo/accuracy"),
                    "likelihood_accuracy": logs.get("ipo/likelihood_accuracy"),
                    "chosen_logp_per_token": logs.get("ipo/chosen_logp_per_token"),
                }
            ),
            "trained_tokens": tokens,
            **self._memory(),
        }
        self._last = (now, tokens)
        self.trained_tokens = tokens
        self.last_train = data
        self.rows.append({"split": "train", **data})
        self.reporter.metrics(data)
        first_loss, first_grad_norm = _first_logged(state)
        diverged = divergence(_number(logs["loss"]), _number(logs.get("grad_norm")), first_loss, first_grad_norm)
        if diverged is not None:
            self.mark_diverged(state.global_step, diverged.reason, non_finite=diverged.non_finite)
            control.should_save = False  # on_log runs before this step's save: keep the last good checkpoint
            control.should_training_stop = True

    def mark_diverged(self, step: int, reason: str, *, non_finite: bool) -> None:
        """Record the first divergence (later ones are consequences of it)."""
        if self.diverged_step is None:
            self.diverged_step = step
            self.diverged_reason = reason
            self.diverged_non_finite = non_finite

    def _report_eval(self, state: TrainerState, logs: dict[str, float]) -> None:
        data: dict[str, Any] = {
            "step": state.global_step,
            "total_steps": self.total_steps,
            "valid_loss": logs.get("eval_loss"),
            **(
                {"valid_token_accuracy": logs.get("eval_mean_token_accuracy")}
                if self.supervised
                else {
                    "valid_ipo_margin": logs.get("eval_ipo/margin"),
                    "valid_preference_accuracy": logs.get("eval_ipo/accuracy"),
                    "valid_likelihood_accuracy": logs.get("eval_ipo/likelihood_accuracy"),
                }
            ),
        }
        self.rows.append({"split": "valid", **data})
        self.reporter.metrics(data)

    def _memory(self) -> dict[str, int]:
        # gpu_memory_bytes feeds the API's ipo_worker_gpu_memory_bytes gauge; absent on CPU (no GPU to report)
        memory = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
        if self._on_cuda and torch.cuda.is_available():
            memory["gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        return memory

    def _tokens_before_resume(self, state: TrainerState) -> int:
        # TRL counts tokens per process run; a resumed run continues from the checkpoint's last count.
        if not hasattr(self, "_resume_tokens"):
            self._resume_tokens = 0
            if self._start and self._start[1] > 0:
                counts = [h.get("trained_tokens", 0) for h in state.log_history if "trained_tokens" in h]
                self._resume_tokens = int(counts[-1]) if counts else 0
        return self._resume_tokens

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if args.world_size > 1:  # every rank writes its RNG state into the checkpoint; rank 0 renames it when all did
            barrier()
            if not state.is_world_process_zero:
                return
        root = Path(str(args.output_dir))
        written = root / f"checkpoint-{state.global_step}"
        final = root / f"step-{state.global_step}"
        if not written.is_dir():
            return
        if final.exists():  # a re-save of the same step (e.g. pause right after a periodic save)
            import shutil

            shutil.rmtree(final)
        os.replace(written, final)
        metrics = {k: v for k, v in self.last_train.items() if k not in ("step", "total_steps")}
        self.last_checkpoint_step = state.global_step
        self.reporter.checkpoint(state.global_step, str(final), metrics)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _first_logged(state: TrainerState) -> tuple[float | None, float | None]:
    """The run's first logged training loss and gradient norm (``log_history`` survives a resume)."""
    for entry in state.log_history:
        if "loss" in entry:
            return _number(entry["loss"]), _number(entry.get("grad_norm"))
    return None, None


class LogAtSaveSteps(TrainerCallback):
    """Logs (hence checks, in ``ReportingCallback.on_log``) every step that saves a checkpoint.

    transformers logs, then saves, in the same step; with ``logging_steps`` not dividing ``save_steps`` a
    checkpoint could otherwise be written after a diverged step nobody looked at yet. Must come after
    transformers' ``DefaultFlowCallback`` (which sets ``should_save``) and ``StopCallback``.
    """

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if control.should_save:
            control.should_log = True


class TokenCountInLogHistory(TrainerCallback):
    """Keeps ``trained_tokens`` in ``state.log_history`` so a resumed run continues the count."""

    def __init__(self, reporting: ReportingCallback) -> None:
        self.reporting = reporting

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        if logs is not None and "loss" in logs and state.log_history:
            state.log_history[-1]["trained_tokens"] = self.reporting.trained_tokens


class NonFiniteGuard(TrainerCallback):
    """Stops at the first step whose trainable weights are no longer finite, before that step's checkpoint
    is written, so the last checkpoint reported is the last good one. Must be the last callback (its
    ``should_save = False`` overrides a pause's save).

    The logged loss is not enough: with NaN log-probabilities TRL's IPO loss can come out as 0 while
    ``grad_norm`` is NaN, and a run would "succeed" with a NaN adapter. Checking the weights costs one
    fused norm over the LoRA parameters and one device sync per step.
    """

    def __init__(self, reporting: ReportingCallback) -> None:
        self.reporting = reporting
        self._params: list[torch.Tensor] = []

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        model = kw.get("model")
        self._params = [p for p in model.parameters() if p.requires_grad] if model is not None else []

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if not self._params or bool(torch.isfinite(torch.stack(torch._foreach_norm(self._params))).all()):
            return
        self.reporting.mark_diverged(state.global_step, "the adapter's weights became NaN/inf", non_finite=True)
        control.should_save = False
        control.should_training_stop = True


class StopCallback(TrainerCallback):
    """Stops at the next step end when ``flag`` is set; on pause, saves a checkpoint first. In a run of
    several processes the ranks agree on the stop at every step end (``distributed.agree_on_stop``)."""

    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.flag.stop_at_step is not None and state.global_step >= self.flag.stop_at_step:
            self.flag.request("paused")
        if args.world_size > 1:  # the worker signals rank 0 only: every rank stops at the same step
            agreed = agree_on_stop(self.flag.reason)
            if agreed is not None:
                self.flag.request(agreed)
        if self.flag.reason is None:
            return
        if self.flag.reason in ("paused", "shutdown"):
            control.should_save = True
        control.should_training_stop = True
