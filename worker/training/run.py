"""The trainer child process: one IPO/DPO LoRA run with TRL's ``DPOTrainer``.

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
from typing import Any

from contracts.logs import configure_logging, log_context
from worker.training.reporter import JsonLinesReporter, Reporter
from worker.training.request import EXIT_OK, EXIT_STOPPED, TrainRequest

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

    flag = stop if stop is not None else StopFlag()
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


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        from worker.training.recipe import ConfigError

        raise ConfigError("device", "cuda was requested but no CUDA device is available")
    return requested


def _train(request: TrainRequest, reporter: Reporter, flag: Any) -> int:
    import torch
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from contracts.data_formats import parse_preference_file
    from worker.training.callbacks import NonFiniteGuard, ReportingCallback, StopCallback, TokenCountInLogHistory
    from worker.training.data import DataError, describe_skipped, load_preference_data
    from worker.training.recipe import resolve_config
    from worker.training.ref_cache import PreparedInputs
    from worker.training.trainer import IpoDPOTrainer

    started = time.monotonic()
    out = Path(request.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(request.device)
    if device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))

    examples, report = parse_preference_file(request.train_file)
    if not report.ok:
        raise DataError(report.summary("training file"))
    model_config = AutoConfig.from_pretrained(request.model_path).to_dict()
    cfg = resolve_config(
        request.method,
        n_train_examples=len(examples),
        model_config_dict=model_config,
        device=device,
        seed=request.seed,
        has_validation=request.validation_file is not None,
        model_dir=Path(request.model_path),
    )
    reporter.resolved(cfg.resolved_dict())

    tokenizer = AutoTokenizer.from_pretrained(request.model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise TrainingFailed("invalid_model", f"{request.model_path} has no chat template", EXIT_BAD_INPUT)
    train_data = load_preference_data(request.train_file, tokenizer, max_length=cfg.max_length)
    eval_data = None
    if request.validation_file:
        eval_data = load_preference_data(
            request.validation_file, tokenizer, max_length=cfg.max_length, name="validation file"
        )
    for prepared, name in ((train_data, "training file"), (eval_data, "validation file")):
        warning = describe_skipped(prepared, cfg.max_length, name) if prepared else None
        if warning:
            reporter.event(warning, level="warn")

    model_kwargs: dict[str, Any] = {
        "dtype": torch.bfloat16 if device == "cuda" else torch.float32,
        "attn_implementation": cfg.attn_implementation,
    }
    if cfg.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model_kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(request.model_path, **model_kwargs)

    cached = PreparedInputs(request, cfg, tokenizer, device)
    precompute = cached.load(cfg.precompute_ref_log_probs)

    loss_type = [cfg.loss_type] + (["sft"] if cfg.sft_weight > 0 else [])
    loss_weights = [1.0] + ([cfg.sft_weight] if cfg.sft_weight > 0 else [])
    args = DPOConfig(
        output_dir=str(out / "checkpoints"),
        loss_type=loss_type,
        loss_weights=loss_weights,
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.n_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler,
        optim=cfg.optim,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        eval_strategy="steps" if eval_data else "no",
        eval_steps=cfg.eval_every,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        gradient_checkpointing=cfg.gradient_checkpointing,
        use_liger_kernel=cfg.use_liger_kernel,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=2 * cfg.batch_size,  # no grad, no activations kept: twice the batch fits
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_total_limit=None,
    )
    peft_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft takes any number: scaling = alpha / r
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    reporting = ReportingCallback(reporter, total_steps=cfg.total_steps, beta=cfg.beta, loss_type=cfg.loss_type)
    trainer = IpoDPOTrainer(
        model=model,
        ref_model=None,  # PEFT: the reference is the base model with the adapter disabled (no second copy)
        args=args,
        train_dataset=cached.train if cached.train is not None else train_data.dataset,
        eval_dataset=cached.eval if cached.eval is not None else (eval_data.dataset if eval_data else None),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[reporting, TokenCountInLogHistory(reporting), StopCallback(flag), NonFiniteGuard(reporting)],
    )
    cached.report_and_store(trainer, reporter)
    reporter.event(
        f"training {cfg.loss_type} LoRA on {train_data.n_examples} pairs for {cfg.total_steps} steps on {device}"
    )
    done_at = _checkpoint_step(request.resume_from)
    if done_at is not None and done_at >= cfg.total_steps:
        # Paused or stopped right after its last step: nothing is left to train. transformers would
        # still run one more step from such a checkpoint (it checks max_steps only after a step).
        _load_adapter(trainer.model, Path(str(request.resume_from)))
        reporter.event(f"resumed at step {done_at} of {cfg.total_steps}: training was already complete")
    else:
        trainer.train(resume_from_checkpoint=request.resume_from)

    if reporting.nan_step is not None:
        kept = reporting.last_checkpoint_step
        raise TrainingFailed(
            "nan_loss",
            f"training diverged at step {reporting.nan_step}: the loss or the weights became NaN/inf. "
            + (f"The last good checkpoint is step {kept}. " if kept is not None else "No checkpoint was kept. ")
            + "Lower the learning rate or raise beta.",
        )
    if flag.reason is not None:
        reporter.event(f"stopped on request ({flag.reason}) at step {trainer.state.global_step}")
        return EXIT_STOPPED

    if eval_data:
        trainer.evaluate()
    adapter_dir = out / "adapter"
    trained: Any = trainer.model
    trained.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    reporter.artifact("adapter", str(adapter_dir))
    metrics_path = out / "metrics.csv"
    _write_csv(metrics_path, reporting.rows)
    reporter.artifact("metrics", str(metrics_path))
    reporter.event(f"training finished in {time.monotonic() - started:.1f}s")
    reporter.done(reporting.trained_tokens)
    return EXIT_OK


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
    reporter = JsonLinesReporter(args.report_fd)
    from worker.training.callbacks import StopFlag

    flag = StopFlag()
    flag.install_signal_handlers()
    try:
        request = TrainRequest.model_validate(json.loads(Path(args.request_json).read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        reporter.error("invalid_request", f"cannot read {args.request_json}: {e}")
        return EXIT_BAD_INPUT
    # This process's stderr is the attempt's trainer.log, whose tail goes into failure messages: text
    # lines (readable there), each carrying the job id and attempt like the worker's own lines.
    configure_logging(os.environ.get("IPO_LOG_LEVEL", "INFO"), "text")
    with log_context(job_id=request.job_id, attempt=request.attempt):
        return train(request, reporter, flag)


if __name__ == "__main__":
    sys.exit(main())
