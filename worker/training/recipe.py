"""The training recipe: one config (``TrainingConfig``) with every default documented with its source.

``resolve_config`` turns a job's ``method`` block (where anything may be ``"auto"``) into concrete values.
Seed recipe: the alignment-handbook Zephyr-7B recipes (HuggingFaceH4/alignment-handbook,
``recipes/zephyr-7b-beta/dpo/config_qlora.yaml`` and the IPO variant of the DPO/IPO/KTO comparison,
huggingface.co/blog/pref-tuning), which train Mistral-7B with QLoRA. Pure pydantic: no torch import.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from contracts.max_length import (
    RECIPE_MAX_LENGTH,
    SFT_MAX_LENGTH,
    TINY_MAX_LENGTH,
    MaxLengthError,
    is_tiny_model,
    resolve_max_length,
)
from contracts.max_length import fit_max_length as _fit_max_length
from contracts.method import PREFERENCE_ONLY, Method
from contracts.model_info import DECODER_LINEAR_NAMES, unknown_target_modules


class ConfigError(ValueError):
    """A setting that cannot work; ``field`` names it (dotted, as in the job's ``method`` block)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# The seed recipe. Sources: "handbook" = alignment-handbook recipes/zephyr-7b-beta/dpo/config_qlora.yaml (QLoRA
# DPO of zephyr-7b-sft-qlora); "pref-tuning blog" = huggingface.co/blog/pref-tuning (the DPO/IPO/KTO sweep);
# "seed" = this project's founding recipe (docs/design.md), where it deliberately differs from the handbook.
ZEPHYR_IPO: dict[str, Any] = {
    "beta": 0.01,  # pref-tuning blog: IPO best at tau=0.01 for Zephyr on UltraFeedback (handbook's beta too)
    "learning_rate": 5.0e-6,  # handbook: learning_rate 5.0e-6
    "n_epochs": 1,  # handbook: num_train_epochs 1
    "batch_size": 4,  # handbook: per_device_train_batch_size 4
    "gradient_accumulation_steps": 4,  # seed: one GPU, 4 x 4 = 16 pairs a step (handbook: 1 a device on 8 GPUs = 32)
    "max_length": RECIPE_MAX_LENGTH,  # handbook: max_length 1024
    "warmup_ratio": 0.1,  # handbook: warmup_ratio 0.1
    "lr_scheduler": "cosine",  # handbook: lr_scheduler_type cosine
    "sft_weight": 0.0,  # pure IPO
    "lora_r": 16,  # seed and handbook: lora_r 16
    "lora_alpha": 64,  # seed (scaling alpha/r = 4); handbook: lora_alpha 16
    "lora_dropout": 0.1,  # seed; handbook: lora_dropout 0.05
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],  # seed; handbook adds gate/up/down_proj
    "quantization": "nf4",  # handbook: load_in_4bit (NF4, as in the QLoRA paper, Dettmers et al. 2023)
    "double_quant": True,  # QLoRA paper: double quantisation
    "gradient_checkpointing": True,  # handbook: gradient_checkpointing true
    "optim": "paged_adamw_8bit",  # seed: paged 8-bit AdamW (QLoRA paper's paged optimiser); handbook: paged_adamw_32bit
}

# The tiny demo model: same code path, "auto" values chosen so the demo learns within ~2 minutes on
# 2 CPU cores (measured; see tests/training/test_learning.py): a large LoRA step (lr 1e-3), a milder
# margin target and an NLL term on chosen against IPO's likelihood displacement.
TINY_IPO: dict[str, Any] = {
    "beta": 0.5,  # per-token margin target 1/(2*0.5) = 1 nat; 0.1 (target 5) displaced the likelihoods
    "learning_rate": 1.0e-3,
    "n_epochs": 3,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_length": TINY_MAX_LENGTH,
    "warmup_ratio": 0.1,
    "lr_scheduler": "cosine",
    "sft_weight": 1.0,  # NLL on chosen: keeps the chosen reply likely while IPO widens the margin
}

# The supervised stage of the same recipe. Source: alignment-handbook recipes/zephyr-7b-beta/sft/config_qlora.yaml
# (commit 0213b5be27f9f60c2f64438244ff8e2fefcba9d0: QLoRA SFT of Mistral-7B-v0.1 on UltraChat 200k, the model that
# the DPO/IPO stage above starts from), "handbook" below.
ZEPHYR_SFT: dict[str, Any] = {
    "learning_rate": 2.0e-4,  # handbook: learning_rate 2.0e-04
    "n_epochs": 1,  # handbook: num_train_epochs 1
    "batch_size": 4,  # handbook: per_device_train_batch_size 4
    "gradient_accumulation_steps": 2,  # handbook: gradient_accumulation_steps 2
    "max_length": SFT_MAX_LENGTH,  # handbook: max_length 2048 (resolved by contracts.max_length)
    "warmup_ratio": 0.1,  # handbook: warmup_ratio 0.1
    "lr_scheduler": "cosine",  # handbook: lr_scheduler_type cosine
    "lora_r": 16,  # handbook: lora_r 16
    "lora_alpha": 16,  # handbook: lora_alpha 16
    "lora_dropout": 0.05,  # handbook: lora_dropout 0.05
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],  # handbook
    "quantization": "nf4",  # handbook: load_in_4bit true
    "double_quant": True,  # QLoRA paper: double quantisation (as the preference stage)
    "gradient_checkpointing": True,  # handbook: gradient_checkpointing true
    "optim": "paged_adamw_8bit",  # seed, as the preference stage (the handbook's SFT config leaves adamw_torch)
}

# Supervised on the tiny demo model: the tiny preference preset's step size and length (the same CPU budget),
# with the LoRA shape of the SFT stage (tests/training/test_sft.py trains with it).
TINY_SFT: dict[str, Any] = {
    "learning_rate": 1.0e-3,
    "n_epochs": 3,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_length": TINY_MAX_LENGTH,
    "warmup_ratio": 0.1,
    "lr_scheduler": "cosine",
}

Device = Literal["cpu", "cuda"]


class TrainingConfig(BaseModel):
    """Everything the trainer needs, concrete (no ``"auto"``). Defaults are the seed recipe's."""

    model_config = ConfigDict(extra="forbid")

    loss_type: Literal["ipo", "sigmoid", "sft"] = "ipo"
    """TRL DPOConfig.loss_type: "ipo" for method ipo, "sigmoid" (DPO) for method dpo; "sft" for method
    supervised (TRL ``SFTTrainer``: cross-entropy on the assistant tokens, see ``sft.py``)."""
    beta: float = ZEPHYR_IPO["beta"]
    """IPO's tau (TRL DPOConfig.beta); the per-token margin target is 1/(2*beta)."""
    sft_weight: float = 0.0
    """Weight of TRL's "sft" loss (NLL of chosen) added to the preference loss; 0 = pure IPO/DPO."""
    learning_rate: float = ZEPHYR_IPO["learning_rate"]
    n_epochs: int = ZEPHYR_IPO["n_epochs"]
    batch_size: int = ZEPHYR_IPO["batch_size"]
    """Per-device pairs per micro-batch (TRL doubles it: chosen + rejected)."""
    n_processes: int = 1
    """Training processes, one per device (the job's ``n_gpus``; ``accelerate launch``, data-parallel): each
    optimiser step sees ``batch_size * gradient_accumulation_steps * n_processes`` pairs."""
    gradient_accumulation_steps: int = ZEPHYR_IPO["gradient_accumulation_steps"]
    max_length: int = ZEPHYR_IPO["max_length"]
    """Tokens of prompt + reply; longer sequences are truncated (keep_start)."""
    warmup_ratio: float = ZEPHYR_IPO["warmup_ratio"]
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_steps: int = -1
    """-1 = n_epochs over the data (transformers' convention)."""
    total_steps: int = 0
    """Optimiser steps this run will take (derived; reported as progress)."""
    checkpoint_every: int = 100
    logging_steps: int = 10
    eval_every: int | None = None
    """Evaluate on the validation file every N steps (None: no validation file)."""
    seed: int = 42
    group_by_length: bool = True
    """Put pairs of similar length in the same batch (transformers' ``train_sampling_strategy=
    "group_by_length"``: each epoch a seeded shuffle, cut into mega-batches of up to 50 batches, each
    sorted by length in 32-token buckets and cut into batches, which are then shuffled; see
    ``batching.py``). A batch is padded to its longest row, so on data of mixed lengths this cuts the
    tokens computed, often by half. Every example is still seen once per epoch; only which pairs share a
    batch changes (the benchmark's full-data loss stays within its seed-to-seed spread). The order
    depends on ``seed`` and the epoch alone, so a resumed run trains on exactly the batches of an
    uninterrupted one. False: TRL's uniform shuffle."""
    precompute_ref_log_probs: bool = True
    """Score every pair with the reference (the base model: the LoRA adapter disabled) once before
    training, in length-sorted batches, instead of a second no-grad forward pass in every step (TRL
    ``DPOConfig.precompute_ref_log_probs``). Same numbers (tests/training/test_fast_paths.py), and the
    scores are cached with the tokenized data (``ref_cache.py``) for retries, resumes and repeated jobs.
    Resolved True when the run covers at least one pass over the data, False for shorter runs: measured
    on 2 CPU cores (bench/RESULTS.md, train_throughput notes), the pass costs what the per-step
    reference forwards of one epoch cost (a one-epoch run takes the same time either way), so it breaks
    even at one epoch, saves that much every further epoch, and all of it when the cache has the scores
    (a cache hit is used whatever this says)."""

    lora_r: int = ZEPHYR_IPO["lora_r"]
    lora_alpha: float = ZEPHYR_IPO["lora_alpha"]
    lora_dropout: float = ZEPHYR_IPO["lora_dropout"]
    target_modules: list[str] = list(ZEPHYR_IPO["target_modules"])
    quantization: Literal["nf4", "none"] = "nf4"
    """nf4 = QLoRA (bitsandbytes 4-bit NF4, double quantisation, bf16 compute); CUDA only."""
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    gradient_checkpointing: bool = True
    """On CUDA for real models only (handbook); the tiny model fits without recomputing activations."""
    optim: str = ZEPHYR_IPO["optim"]
    attn_implementation: Literal["sdpa", "flash_attention_2"] = "sdpa"
    """PyTorch SDPA everywhere; Flash-Attention 2 on CUDA when the ``flash-attn`` package is installed."""
    use_liger_kernel: bool = False
    """Liger's fused RMSNorm/SwiGLU/RoPE kernels on CUDA when ``liger-kernel`` is installed."""
    device: Device = "cuda"
    chat_template: str = "model"
    """The chat template conversations are formatted with (``contracts/chat_templates.py``): ``model`` (the
    model's own), a named one (``zephyr`` is the default for a base model without one), or ``custom``.
    Saved with the adapter's tokenizer. Set once the tokenizer is loaded."""
    text_rows: Literal["chat_template", "verbatim"] | None = None
    """What was done with the training file's text rows (``contracts/text_rows.py``): formatted with the
    chat template, or used verbatim (TRL's text format) because they already carry chat markup; None
    when the file has no text rows. Set once the data is loaded."""

    def resolved_dict(self) -> dict[str, Any]:
        """JSON-able record of every value used (stored on the job as its resolved hyperparameters)."""
        return self.model_dump(mode="json")


def _is_tiny(model_config_dict: dict[str, Any]) -> bool:
    return is_tiny_model(model_config_dict)


def _installed(module: str) -> bool:
    """An optional speed-up is used only where its package is installed (the ``flash`` / ``liger`` extras)."""
    return importlib.util.find_spec(module) is not None


# -- 1. preset: which defaults "auto" stands for --------------------------------------------------------------


def preset_for(model_config_dict: dict[str, Any], method_type: str = "ipo") -> dict[str, Any]:
    """The defaults that ``"auto"`` resolves to for this model and method: ``TINY_IPO`` for the demo-sized
    models (hidden size <= 512 and <= 8 layers), else the seed recipe ``ZEPHYR_IPO``; keys missing from a
    preset fall back to ``ZEPHYR_IPO``. For ``supervised``: ``TINY_SFT`` / ``ZEPHYR_SFT`` the same way,
    falling back to ``ZEPHYR_SFT``."""
    if method_type == "supervised":
        return {**ZEPHYR_SFT, **(TINY_SFT if _is_tiny(model_config_dict) else {})}
    preset = TINY_IPO if _is_tiny(model_config_dict) else ZEPHYR_IPO
    return {**ZEPHYR_IPO, **preset}


def _pick(value: Any, preset: dict[str, Any], key: str) -> Any:
    return preset[key] if value == "auto" else value


# -- 2. steps: how long the run is, and how often it saves, logs and evaluates -----------------------------------


@dataclass(frozen=True)
class StepPlan:
    """The optimiser-step schedule of a run, derived from the data size and the batch settings."""

    total_steps: int
    """Optimiser steps the run takes: ``max_steps`` when set, else ``n_epochs * ceil(n / (batch * accum *
    n_processes))``."""
    checkpoint_every: int
    """Explicit, or a quarter of the run capped at 200 steps (at least 1): four resumable points per run."""
    logging_steps: int
    """About 20 metric reports per run, at most every 10 steps."""
    eval_every: int | None
    """A quarter of the run when there is a validation file (four evaluations), else None."""
    precompute_ref_log_probs: bool
    """True when the run covers at least one pass over the data (the break-even measured in
    bench/RESULTS.md; see ``TrainingConfig.precompute_ref_log_probs``)."""


def plan_steps(
    *,
    n_train_examples: int,
    batch_size: int,
    gradient_accumulation_steps: int,
    n_epochs: int,
    max_steps: int,
    checkpoint_every: int | None,
    has_validation: bool,
    n_processes: int = 1,
) -> StepPlan:
    """Derive the step schedule; ``max_steps`` -1 means "n_epochs over the data" (transformers' convention).
    ``n_processes`` data-parallel processes each take ``batch_size * gradient_accumulation_steps`` pairs a step."""
    pairs_per_step = batch_size * gradient_accumulation_steps * n_processes
    steps_per_epoch = max(1, math.ceil(n_train_examples / pairs_per_step))
    total_steps = max_steps if max_steps > 0 else steps_per_epoch * n_epochs
    return StepPlan(
        total_steps=total_steps,
        checkpoint_every=checkpoint_every or max(1, min(200, total_steps // 4 or 1)),
        logging_steps=max(1, min(10, total_steps // 20 or 1)),
        eval_every=max(1, total_steps // 4) if has_validation else None,
        precompute_ref_log_probs=total_steps * pairs_per_step >= n_train_examples,
    )


# -- 3. validation: settings this model and device cannot train with -------------------------------------------


def _unknown_targets(
    model_dir: Path | None, model_config_dict: dict[str, Any], targets: list[str]
) -> tuple[list[str], list[str]]:
    """The same answer the API gave at job creation: module paths from the model's safetensors headers
    (``contracts.model_info``), or, without a directory, the decoder family's linear layer names."""
    if model_dir is not None:
        return unknown_target_modules(model_dir, targets)  # ([], []): an architecture it cannot check
    known = DECODER_LINEAR_NAMES
    return [t for t in targets if t.rsplit(".", 1)[-1] not in known], sorted(known)


def check_quantization(quantization: str, device: str) -> None:
    """Raises ``ConfigError`` for QLoRA off CUDA (bitsandbytes 4-bit on CPU leaves LoRA gradients at zero)."""
    if quantization == "nf4" and device != "cuda":
        raise ConfigError(
            "lora.quantization",
            "nf4 (QLoRA) needs a CUDA device; bitsandbytes 4-bit on CPU silently leaves LoRA gradients at "
            "zero. Use quantization 'none' on CPU.",
        )


def check_target_modules(model_dir: Path | None, model_config_dict: dict[str, Any], targets: list[str]) -> None:
    """Raises ``ConfigError`` naming LoRA targets the model does not have, and the ones it has."""
    unknown, choices = _unknown_targets(model_dir, model_config_dict, targets)
    if unknown:
        raise ConfigError(
            "lora.target_modules",
            f"{', '.join(unknown)} not in this model ({model_config_dict.get('model_type', 'unknown')}); "
            f"choose from {', '.join(choices)}",
        )


def fit_max_length(max_length: int, *, explicit: bool, model_config_dict: dict[str, Any]) -> int:
    """``max_length`` capped at the model's positions; an explicit value over them raises ``ConfigError``
    (``contracts.max_length.fit_max_length``, which the API uses too)."""
    try:
        return _fit_max_length(max_length, explicit=explicit, model_config_dict=model_config_dict)
    except MaxLengthError as exc:
        raise ConfigError("hyperparameters.max_length", str(exc)) from exc


# -- all together ---------------------------------------------------------------------------------------------


def resolve_config(
    method: Method,
    *,
    n_train_examples: int,
    model_config_dict: dict[str, Any],
    device: str,
    seed: int = 42,
    has_validation: bool = False,
    model_dir: Path | None = None,
    n_processes: int = 1,
) -> TrainingConfig:
    """Resolve every ``"auto"`` in ``method`` for this dataset size, model and device: preset, then the step
    plan, then the checks.

    Raises ``ConfigError`` (naming the field) for settings that cannot work.
    """
    if device not in ("cpu", "cuda"):
        raise ConfigError("device", f"must be 'cpu' or 'cuda', got {device!r}")
    params = method.params()
    hp, lora = params.hyperparameters, params.lora
    preset = preset_for(model_config_dict, method.type)
    supervised = method.type == "supervised"
    for name in PREFERENCE_ONLY if supervised else ():
        if getattr(hp, name) != "auto":
            raise ConfigError(f"hyperparameters.{name}", "applies to preference methods (ipo, dpo), not supervised")

    beta = 0.0 if supervised else _pick(hp.beta, preset, "beta")
    if method.type == "dpo" and hp.beta == "auto":
        beta = 0.1  # TRL/DPO paper default temperature; IPO's tau=0.01 would be far too sharp for sigmoid
    learning_rate = _pick(hp.learning_rate, preset, "learning_rate")
    if hp.learning_rate_multiplier != "auto":
        learning_rate = learning_rate * float(hp.learning_rate_multiplier)
    batch_size = max(1, min(int(_pick(hp.batch_size, preset, "batch_size")), n_train_examples))
    grad_accum = int(_pick(hp.gradient_accumulation_steps, preset, "gradient_accumulation_steps"))
    n_epochs = int(_pick(hp.n_epochs, preset, "n_epochs"))
    max_steps = -1 if hp.max_steps == "auto" else int(hp.max_steps)
    plan = plan_steps(
        n_train_examples=n_train_examples,
        batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        n_epochs=n_epochs,
        max_steps=max_steps,
        checkpoint_every=None if hp.checkpoint_every == "auto" else int(hp.checkpoint_every),
        has_validation=has_validation,
        n_processes=n_processes,
    )

    quantization = lora.quantization if lora.quantization != "auto" else ("nf4" if device == "cuda" else "none")
    check_quantization(quantization, device)
    target_modules = list(_pick(lora.target_modules, preset, "target_modules"))
    check_target_modules(model_dir, model_config_dict, target_modules)
    try:  # the same function the API resolved it with at job creation
        max_length = resolve_max_length(hp.max_length, model_config_dict, method.type)
    except MaxLengthError as exc:
        raise ConfigError("hyperparameters.max_length", str(exc)) from exc

    on_cuda = device == "cuda"
    return TrainingConfig(
        loss_type="sft" if supervised else ("ipo" if method.type == "ipo" else "sigmoid"),
        beta=float(beta),
        sft_weight=0.0 if supervised else float(_pick(hp.sft_weight, preset, "sft_weight")),
        learning_rate=float(learning_rate),
        n_epochs=n_epochs,
        batch_size=batch_size,
        n_processes=n_processes,
        gradient_accumulation_steps=grad_accum,
        max_length=max_length,
        warmup_ratio=float(_pick(hp.warmup_ratio, preset, "warmup_ratio")),
        lr_scheduler=_pick(hp.lr_scheduler, preset, "lr_scheduler"),
        max_steps=max_steps,
        total_steps=plan.total_steps,
        checkpoint_every=plan.checkpoint_every,
        logging_steps=plan.logging_steps,
        eval_every=plan.eval_every,
        seed=seed,
        precompute_ref_log_probs=plan.precompute_ref_log_probs and not supervised,  # SFT has no reference
        lora_r=int(_pick(lora.r, preset, "lora_r")),
        lora_alpha=float(_pick(lora.alpha, preset, "lora_alpha")),
        lora_dropout=float(_pick(lora.dropout, preset, "lora_dropout")),
        target_modules=target_modules,
        quantization=quantization,
        double_quant=quantization == "nf4",
        compute_dtype="bfloat16" if on_cuda else "float32",
        gradient_checkpointing=on_cuda and not _is_tiny(model_config_dict),
        attn_implementation="flash_attention_2" if on_cuda and _installed("flash_attn") else "sdpa",
        use_liger_kernel=on_cuda and _installed("liger_kernel"),
        optim="paged_adamw_8bit" if quantization == "nf4" else "adamw_torch",
        device="cuda" if on_cuda else "cpu",
    )
