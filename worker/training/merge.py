"""Merge a trained LoRA adapter into its base model: a standalone model directory (``ipo adapters merge``).

Loads the base with ``AutoModelForCausalLM``, applies the adapter with ``PeftModel.from_pretrained``, folds it
in with ``merge_and_unload`` and writes safetensors weights plus the tokenizer (chat template included) from
the adapter directory when it has one (the trainer saves it there), else from the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class MergeError(ValueError):
    pass


def merge_adapter(
    base: str | Path, adapter: str | Path, out: str | Path, dtype: Any = None, parents: list[Path] | None = None
) -> Path:
    """Write ``base`` with ``parents`` (root first: the lineage of a job that started from a fine-tuned model)
    and then ``adapter`` merged in, as a standalone model. Raises ``MergeError`` for a missing directory."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter, out = Path(base), Path(adapter), Path(out)
    for parent in parents or []:
        if not (parent / "adapter_config.json").is_file():
            raise MergeError(f"{parent} is not a PEFT adapter directory (no adapter_config.json)")
    if not (base / "config.json").is_file():
        raise MergeError(f"{base} is not a model directory (no config.json)")
    if not (adapter / "adapter_config.json").is_file():
        raise MergeError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    if out.resolve() in (base.resolve(), adapter.resolve()):
        raise MergeError("--out must differ from --base and --adapter")

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or torch.float32)
    for parent in parents or []:  # the starting model the job trained on, as the worker built it
        model = PeftModel.from_pretrained(model, str(parent)).merge_and_unload()
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    merged = peft_model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)

    tok_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_source))
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is not None:
        if tokenizer.chat_template is None and tok_source != base:
            base_tok = AutoTokenizer.from_pretrained(str(base))
            tokenizer.chat_template = base_tok.chat_template
        tokenizer.save_pretrained(str(out))
    return out
