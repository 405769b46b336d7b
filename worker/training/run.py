"""The trainer child process: one IPO/DPO LoRA run with TRL's ``DPOTrainer`` (built in ``preference.py``), or
a supervised one with TRL's ``SFTTrainer`` (``sft.py``); both share the configuration, callbacks, checkpoints
and outputs. ``_train`` reads top to bottom as the run's steps, in the order of TRL's ``scripts/dpo.py``.

``python -m worker.training.run REQUEST_JSON --report-fd N`` (see ``worker/training/request.py`` for
the contract: report lines, signals, exit codes). ``train()`` is the in-process entry point.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contracts.logs import configure_logging, log_context
from worker.training.distributed import NullReporter, current_rank, open_report_fd, record_exit, start_rank
from worker.training.preference import build_preference_trainer
from worker.training.reporter import JsonLinesReporter, Reporter
from worker.training.request import EXIT_OK, EXIT_STOPPED, TrainRequest

if TYPE_CHECKING:
    from worker.training.recipe import TrainingConfig

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

log = logging.getLogger(__name__)


class TrainingFailed(Exception):
    def __init__(self, code: str, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = exit_code


def train(request: TrainRequest, reporter: Reporter, stop: Any | None = None) -> int:
    """Run one training attempt; returns the exit code (0 ok, 75 stopped on request, else failure)."""
    import torch

    from worker.training.callbacks import StopFlag
    from worker.training.data import DataError
    from worker.training.recipe import ConfigError
    from worker.training.trackers import TrackingReporter, tracking_reporter

    flag = stop if stop is not None else StopFlag()
    if current_rank().is_main:  # the other ranks of a launched run report nothing, so track nothing either
        reporter = tracking_reporter(request, reporter)
    try:
        return _train(request, reporter, flag)
    except TrainingFailed as e:
        reporter.error(e.code, e.message)
        return e.exit_code
    except DataError as e:
        reporter.error("invalid_training_file", str(e))
        return EXIT_BAD_INPUT
    except ConfigError as e:
        reporter.error("invalid_hyperparameters", str(e))
        return EXIT_BAD_INPUT
    except torch.cuda.OutOfMemoryError as e:
        reporter.error("out_of_memory", f"CUDA out of memory: {e}. Lower batch_size or max_length.")
        return EXIT_FAILED
    except Exception as e:  # the report is the only way the worker learns why
        log.exception("training failed")
        reporter.error("internal_error", f"{type(e).__name__}: {e}")
        return EXIT_FAILED
    finally:
        if isinstance(reporter, TrackingReporter):  # stopped on request: end the runs (resumable)
            reporter.close(succeeded=False)


def _train(request: TrainRequest, reporter: Reporter, flag: Any) -> int:
    """One attempt, start to end, in the order of TRL's ``scripts/dpo.py``: data and config, model, trainer,
    train, save. Each step is a small function below."""
    import torch

    from contracts.chat_templates import special_tokens
    from worker.training.holdout import hold_out_for_samples
    from worker.training.ipo_target import far_target_warning
    from worker.training.loading import load_tokenizer, resolve_device
    from worker.training.sft import build_supervised_trainer

    started = time.monotonic()
    out = Path(request.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(request.device)
    rank = current_rank()
    if device == "cpu":  # the host's cores shared by this host's processes of the run
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rank.world_size))

    # 1. configuration: every "auto" resolved for this data, model and device (after samples' held-out prompts)
    specials = special_tokens(Path(request.model_path))
    request, held_out = hold_out_for_samples(request, reporter, specials, out)
    cfg = _resolve(request, device, specials)
    hp = request.method.params().hyperparameters
    auto_rate = hp.learning_rate == "auto" and hp.learning_rate_multiplier == "auto"
    if (advice := far_target_warning(cfg, learning_rate_auto=auto_rate)) is not None:
        reporter.event(advice[0], level="warn", data={"ipo_margin_target_warning": advice[1]})

    # 2-4. tokenizer, data, model and trainer: TRL's DPOTrainer (ipo, dpo) or SFTTrainer (supervised)
    tokenizer = load_tokenizer(request.model_path)
    template = _chat_template(request, tokenizer, reporter)
    if cfg.loss_type == "sft":
        trainer, reporting, n_examples = build_supervised_trainer(
            request, reporter, flag, cfg, template, tokenizer, out
        )
    else:
        trainer, reporting, n_examples = build_preference_trainer(
            request, reporter, flag, cfg, template, tokenizer, out, device, specials, held_out
        )
    unit = "examples" if cfg.loss_type == "sft" else "pairs"
    where = f"{rank.world_size} x {device} (data-parallel)" if rank.distributed else device
    reporter.event(f"training {cfg.loss_type} LoRA on {n_examples} {unit} for {cfg.total_steps} steps on {where}")

    if request.init_adapter and not request.resume_from:
        try:
            _load_adapter(trainer.model, Path(request.init_adapter))
        except RuntimeError as exc:  # size mismatch: another LoRA rank or other target modules
            raise TrainingFailed(
                "invalid_hyperparameters",
                f"the from_checkpoint adapter does not fit this job's LoRA (keep r and target_modules): {exc}",
                EXIT_BAD_INPUT,
            ) from exc
        reporter.event(
            "warm start: the adapter starts from the from_checkpoint weights; optimiser state and learning-rate "
            "schedule start fresh (not a resume)"
        )

    # 5. train (or finish a run that was paused right after its last step)
    _train_or_finish(trainer, request.resume_from, cfg.total_steps, reporter)
    _raise_if_diverged(reporting)
    if flag.reason is not None:
        reporter.event(f"stopped on request ({flag.reason}) at step {trainer.state.global_step}")
        return EXIT_STOPPED

    # 6. final evaluation (every rank: it is collective), samples and outputs (rank 0 alone)
    if trainer.eval_dataset is not None:
        trainer.evaluate()
    if not rank.is_main:
        return EXIT_OK
    _final_samples(trainer, reporter, started)
    _save_outputs(trainer, tokenizer, out, reporting, reporter)
    reporter.event(f"training finished in {time.monotonic() - started:.1f}s")
    reporter.done(reporting.trained_tokens)
    return EXIT_OK


def _chat_template(request: TrainRequest, tokenizer: Any, reporter: Reporter) -> str:
    """Set the job's chat template on the tokenizer (so TRL formats with it and it is saved with the
    adapter); returns its name for the resolved hyperparameters. A base model without a template gets
    the recipe's default, said in an event."""
    from contracts.chat_templates import ChatTemplateError, resolve_chat_template
    from worker.training.recipe import ConfigError

    try:
        choice = resolve_chat_template(request.method.params().chat_template, Path(request.model_path))
    except ChatTemplateError as exc:
        raise ConfigError("chat_template", str(exc)) from exc
    tokenizer.chat_template = choice.template
    if choice.source != "model":
        reporter.event(choice.describe(Path(request.model_path).name))
    return choice.name


def _resolve(request: TrainRequest, device: str, specials: tuple[str, ...]) -> TrainingConfig:
    """Validate the training file (the worker never trusts the API's check) and resolve the config for it."""
    from transformers import AutoConfig

    from contracts.data_formats import parse_preference_file
    from contracts.sft_formats import parse_supervised_file
    from worker.training.data import DataError
    from worker.training.recipe import resolve_config

    if request.method.is_preference:
        examples: list[Any]
        examples, report = parse_preference_file(request.train_file, special_tokens=specials)
    else:
        examples, report = parse_supervised_file(request.train_file)
    if not report.ok:
        raise DataError(report.summary("training file"))
    return resolve_config(
        request.method,
        n_train_examples=len(examples),
        model_config_dict=AutoConfig.from_pretrained(request.model_path).to_dict(),
        device=device,
        seed=request.seed,
        has_validation=request.validation_file is not None,
        model_dir=Path(request.model_path),
        n_processes=current_rank().world_size,
    )


def _final_samples(trainer: Any, reporter: Reporter, started: float) -> None:
    """The end-of-training samples round, when the trainer has a ``SamplesCallback``, and its cost."""
    from worker.training.samples import SamplesCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, SamplesCallback):
            callback.final(trainer.model, trainer.state.global_step)
            reporter.event(f"sampling took {callback.seconds:.1f}s of {time.monotonic() - started:.1f}s")


def _train_or_finish(trainer: Any, resume_from: str | None, total_steps: int, reporter: Reporter) -> None:
    """``trainer.train``, resuming from ``resume_from`` when given. A checkpoint already at ``total_steps``
    (paused or stopped right after its last step) is loaded instead: transformers would still run one more
    step from it, as it checks ``max_steps`` only after a step."""
    done_at = _checkpoint_step(resume_from)
    if done_at is not None and done_at >= total_steps:
        _load_adapter(trainer.model, Path(str(resume_from)))
        reporter.event(f"resumed at step {done_at} of {total_steps}: training was already complete")
    else:
        trainer.train(resume_from_checkpoint=resume_from)


def _raise_if_diverged(reporting: Any) -> None:
    """``TrainingFailed`` naming the step, what diverged and the last good checkpoint when a guard fired:
    code ``nan_loss`` when the loss, gradient norm or weights became NaN/inf, ``diverged`` when they stayed
    finite but exploded (``worker.training.callbacks.divergence``)."""
    if reporting.diverged_step is None:
        return
    kept = reporting.last_checkpoint_step
    raise TrainingFailed(
        "nan_loss" if reporting.diverged_non_finite else "diverged",
        f"training diverged at step {reporting.diverged_step}: {reporting.diverged_reason}. "
        + (f"The last good checkpoint is step {kept}. " if kept is not None else "No checkpoint was kept. ")
        + "Lower the learning rate or raise beta.",
    )


def _save_outputs(trainer: Any, tokenizer: Any, out: Path, reporting: Any, reporter: Reporter) -> None:
    """The adapter (PEFT weights + config, with the tokenizer and its chat template beside them, so whoever
    loads it formats prompts the same way) and the metrics CSV, each reported as an artifact."""
    adapter_dir = out / "adapter"
    trainer.model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    reporter.artifact("adapter", str(adapter_dir))
    metrics_path = out / "metrics.csv"
    _write_csv(metrics_path, reporting.rows)
    reporter.artifact("metrics", str(metrics_path))


def _checkpoint_step(checkpoint: str | None) -> int | None:
    """The optimiser step a checkpoint was saved at (its trainer_state.json), or None."""
    if not checkpoint:
        return None
    try:
        return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # let transformers report what is wrong with it


def _load_adapter(model: Any, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one IPO/DPO training attempt (child of the worker).")
    parser.add_argument("request_json", help="path to the TrainRequest JSON file")
    parser.add_argument("--report-fd", type=int, default=1, help="file descriptor for TrainerReport JSON lines")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from worker.training.callbacks import StopFlag

    flag = StopFlag()
    flag.install_signal_handlers()
    rank = current_rank()  # rank 0 of 1 unless started by accelerate launch (worker/training/distributed.py)
    reporter: JsonLinesReporter | NullReporter = (
        JsonLinesReporter(open_report_fd(args.report_fd, rank)) if rank.is_main else NullReporter()
    )
    try:
        request = TrainRequest.model_validate(json.loads(Path(args.request_json).read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        reporter.error("invalid_request", f"cannot read {args.request_json}: {e}")
        return EXIT_BAD_INPUT
    if rank.distributed:
        start_rank(rank, Path(request.output_dir))
    # This process's stderr is the attempt's trainer.log, whose tail goes into failure messages: text
    # lines (readable there), each carrying the job id and attempt like the worker's own lines.
    configure_logging(os.environ.get("IPO_LOG_LEVEL", "INFO"), "text")
    with log_context(job_id=request.job_id, attempt=request.attempt):
        code = train(request, reporter, flag)
    if rank.distributed:
        errors = reporter.errors if isinstance(reporter, NullReporter) else []
        record_exit(rank, Path(request.output_dir), code, errors[0] if errors else None)
    return code


if __name__ == "__main__":
    sys.exit(main())
