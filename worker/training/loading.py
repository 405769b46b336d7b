"""Loading what a run trains: the device, the tokenizer, the base model (4-bit NF4 for QLoRA on CUDA) and
the LoRA configuration, each from a resolved ``TrainingConfig`` (``recipe.py``).

The equivalent of the model-loading part of TRL's ``scripts/dpo.py`` (``ModelConfig`` ->
``get_quantization_config`` / ``get_peft_config``), written out for the one recipe this service runs.
"""

from __future__ import annotations

import os
from typing import Any

from worker.training.recipe import ConfigError, TrainingConfig


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is visible, else ``cpu``; ``cuda`` without one raises
    ``ConfigError`` (field ``device``)."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was requested but no CUDA device is available")
    return requested


def load_tokenizer(model_path: str) -> Any:
    """The model directory's tokenizer, with ``pad_token`` falling back to ``eos_token`` (TRL pads batches;
    Llama/Mistral tokenizers ship without a pad token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_kwargs(cfg: TrainingConfig) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments: bf16 on CUDA / fp32 on CPU, the attention implementation, and
    for ``quantization="nf4"`` the QLoRA paper's 4-bit NF4 with double quantisation and bf16 compute, the
    whole model on this process's device (``LOCAL_RANK``, 0 without a launcher)."""
    import torch

    kwargs: dict[str, Any] = {
        "dtype": torch.bfloat16 if cfg.device == "cuda" else torch.float32,
        "attn_implementation": cfg.attn_implementation,
    }
    if cfg.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        from worker.training.distributed import fsdp_active

        sharded = fsdp_active()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
            # QLoRA + FSDP: 4-bit weights stored as bf16 so FSDP can flatten and shard them with the rest
            # (the bitsandbytes/PEFT/accelerate recipe, docs/multi-gpu.md); the default uint8 otherwise
            **({"bnb_4bit_quant_storage": torch.bfloat16} if sharded else {}),
        )
        if not sharded:  # FSDP places the shards itself
            # the whole model on this process's device: device 0, or LOCAL_RANK under accelerate launch (DDP)
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return kwargs


def load_model(model_path: str, cfg: TrainingConfig, parent_adapters: list[str] | None = None) -> Any:
    """The base causal LM, loaded as ``model_kwargs(cfg)`` says (local files only: never a hub id), with each
    of ``parent_adapters`` (root first) merged into its weights: the starting model of a job on a fine-tuned
    model. The new adapter then trains on top, and with it disabled the model is exactly that merged
    starting model, which TRL uses as the IPO/DPO reference (``ref_model=None`` with PEFT). In fp32/bf16 the
    merge is exact up to rounding; into 4-bit NF4 weights (QLoRA) PEFT dequantises, adds the LoRA delta and
    quantises again, so the starting model is the merged model as NF4 represents it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, **model_kwargs(cfg))
    for adapter in parent_adapters or []:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=False).merge_and_unload()
    return model


def lora_config(cfg: TrainingConfig) -> Any:
    """PEFT ``LoraConfig`` for a causal LM: rank, alpha (scaling = alpha / r), dropout and target modules from
    the recipe, no bias training."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft takes any number: scaling = alpha / r
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
