"""The ``transformers.TrainingArguments`` both stages share, for TRL's ``DPOConfig`` (``preference.dpo_args``)
and ``SFTConfig`` (``sft.sft_args``): schedule, batch, checkpoints, evaluation cadence, precision, seeds and
reporting, all from the resolved ``TrainingConfig``. Each stage adds its own loss settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.training.recipe import TrainingConfig


def shared_arguments(cfg: TrainingConfig, out: Path, *, evaluate: bool) -> dict[str, Any]:
    """Keyword arguments common to ``DPOConfig`` and ``SFTConfig``: checkpoints under ``out/checkpoints``
    every ``checkpoint_every`` steps (all kept: the worker uploads and deletes them), evaluation every
    ``eval_every`` steps when ``evaluate``, bf16 on CUDA and fp32 on CPU, no hub, no trackers (progress is
    reported through the callbacks), no dataloader workers."""
    on_cuda = cfg.device == "cuda"
    return {
        "output_dir": str(out / "checkpoints"),
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.n_epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_length": cfg.max_length,
        "warmup_steps": cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        "lr_scheduler_type": cfg.lr_scheduler,
        "optim": cfg.optim,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.checkpoint_every,
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": cfg.eval_every,
        "bf16": on_cuda,
        "use_cpu": not on_cuda,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "use_liger_kernel": cfg.use_liger_kernel,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        # several processes (DDP): every LoRA weight takes part in every forward, so DDP need not search the
        # graph for unused ones each step (transformers' default for a model without gradient checkpointing)
        "ddp_find_unused_parameters": False,
        "save_total_limit": None,
    }
