"""Load preference files for training: validate (``contracts.data_formats``), keep them conversational
(TRL 1.16 applies the chat template itself, prompt with ``add_generation_prompt=True``), and count the
examples that ``max_length`` would leave without a completion (TRL drops those silently)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from contracts.data_formats import PreferenceExample, parse_preference_file


class DataError(ValueError):
    """The file cannot be trained on; ``str(e)`` is the validator's (or our) message for the user."""


@dataclass
class PreparedData:
    dataset: Dataset
    n_examples: int
    n_truncated: int
    """Examples whose prompt + reply exceeds max_length (the reply is cut, still usable)."""
    n_unusable: int
    """Examples whose prompt alone fills max_length (no completion token left: dropped by TRL)."""
    unusable_lines: list[int]
    n_tokens: int
    """Prompt + chosen + rejected tokens over the file (one epoch), before truncation."""


def chat_token_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool = False
) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template (what TRL feeds the model)."""
    out: Any = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
    )
    return [int(i) for i in out["input_ids"]]


def load_preference_data(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    name: str = "training file",
    max_unusable_fraction: float = 0.5,
) -> PreparedData:
    """Validate ``path`` and build a conversational ``datasets.Dataset`` (prompt/chosen/rejected).

    Raises ``DataError`` when the file is invalid, or when more than ``max_unusable_fraction`` of the
    examples leave no room for the completion at ``max_length``.
    """
    examples, report = parse_preference_file(path)
    if not report.ok:
        raise DataError(report.summary(name))
    unusable: list[int] = []
    n_truncated = n_tokens = 0
    for ex in examples:
        prompt_len = len(chat_token_ids(tokenizer, ex.prompt, generation_prompt=True))
        lengths = [
            len(chat_token_ids(tokenizer, ex.prompt + reply, generation_prompt=False))
            for reply in (ex.chosen, ex.rejected)
        ]
        n_tokens += prompt_len + sum(n - prompt_len for n in lengths)
        if prompt_len >= max_length:
            unusable.append(ex.line)
        elif max(lengths) > max_length:
            n_truncated += 1
    if examples and len(unusable) > max_unusable_fraction * len(examples):
        raise DataError(
            f"{name}: {len(unusable)} of {len(examples)} examples have a prompt of {max_length} tokens or more "
            f"(max_length), leaving no room for the reply (lines {_lines(unusable)}); "
            "raise max_length or shorten prompts"
        )
    usable = [ex for ex in examples if ex.line not in set(unusable)]
    return PreparedData(
        dataset=_to_dataset(usable),
        n_examples=len(usable),
        n_truncated=n_truncated,
        n_unusable=len(unusable),
        unusable_lines=unusable,
        n_tokens=n_tokens,
    )


def _to_dataset(examples: list[PreferenceExample]) -> Dataset:
    return Dataset.from_list([{"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected} for ex in examples])


def _lines(lines: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(n) for n in lines[:limit])
    return shown + (f" and {len(lines) - limit} more" if len(lines) > limit else "")


def describe_skipped(prepared: PreparedData, max_length: int, name: str = "training file") -> str | None:
    """A warning for the job's events, or None when every example fits."""
    parts = []
    if prepared.n_unusable:
        parts.append(
            f"{prepared.n_unusable} examples skipped: the prompt alone fills max_length={max_length} "
            f"(lines {_lines(prepared.unusable_lines)})"
        )
    if prepared.n_truncated:
        parts.append(f"{prepared.n_truncated} examples truncated to max_length={max_length}")
    return f"{name}: " + "; ".join(parts) if parts else None
