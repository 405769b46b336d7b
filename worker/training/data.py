"""Load preference files for training: validate (``contracts.data_formats``), keep them conversational
(TRL 1.16 applies the chat template itself, prompt with ``add_generation_prompt=True``) or, for text rows
that already carry chat markup, as TRL's standard text format (``contracts/text_rows.py``), and leave
out what cannot teach anything: examples whose prompt fills ``max_length`` (TRL drops those silently)
and pairs whose replies are the same tokens once cut at ``max_length`` (``contracts/pair_tokens.py``).
A conversation the chat template refuses fails the file with the lines and the template's message."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from contracts.chat_templates import describe_template_refusals, template_message
from contracts.data_formats import PreferenceExample, parse_preference_file
from contracts.pair_tokens import PairTokens, describe_left_out, describe_lines, split_pair


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
    identical_lines: list[int] = field(default_factory=list)
    """Pairs whose replies are the same tokens once cut at max_length: left out of the dataset."""
    text_mode: str | None = None
    """What was done with text rows: ``chat_template``, ``verbatim`` or None (no text rows)."""
    text_rows: str | None = None
    """The same in words, with the lines that decided it (for the job's events)."""


def chat_token_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool = False
) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template (what TRL feeds the model)."""
    out: Any = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
    )
    return [int(i) for i in out["input_ids"]]


def tokenizer_special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The tokenizer's special tokens: the named ones and the added tokens marked special."""
    found = set(tokenizer.all_special_tokens)
    found |= {str(t.content) for t in tokenizer.added_tokens_decoder.values() if t.special}
    return tuple(sorted(t for t in found if t.strip()))


def pair_tokens(tokenizer: PreTrainedTokenizerBase, ex: PreferenceExample) -> PairTokens:
    """The pair tokenized as TRL 1.16's ``DPOTrainer._prepare_dataset`` does it (raises what the chat
    template raises when it refuses the conversation, ``jinja2.TemplateError`` from ``raise_exception``)."""
    if ex.verbatim and ex.text is not None:
        prompt, chosen, rejected = ex.text
        eos = tokenizer.eos_token or ""
        ids = [
            list(tokenizer(text=t)["input_ids"])
            for t in (
                prompt,
                prompt + (chosen if chosen.endswith(eos) else chosen + eos),
                prompt + (rejected if rejected.endswith(eos) else rejected + eos),
            )
        ]
        return split_pair(ids[0], ids[1], ids[2])
    return split_pair(
        chat_token_ids(tokenizer, ex.prompt, generation_prompt=True),
        chat_token_ids(tokenizer, ex.prompt + ex.chosen),
        chat_token_ids(tokenizer, ex.prompt + ex.rejected),
    )


def load_preference_data(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    name: str = "training file",
    max_unusable_fraction: float = 0.5,
    special_tokens: Sequence[str] | None = None,
) -> PreparedData:
    """Validate ``path`` and build a ``datasets.Dataset`` (prompt/chosen/rejected: messages, or strings
    for text rows used verbatim).

    ``special_tokens``: the model's special tokens as the API reads them (``contracts.chat_templates.
    special_tokens``), so both decide the text mode alike; default: the tokenizer's own.
    Raises ``DataError`` when the file is invalid, when the chat template refuses a conversation, when
    more than ``max_unusable_fraction`` of the examples leave no room for the completion at
    ``max_length``, or when no pair is left to train on.
    """
    specials = tokenizer_special_tokens(tokenizer) if special_tokens is None else special_tokens
    examples, report = parse_preference_file(path, special_tokens=specials)
    if not report.ok:
        raise DataError(report.summary(name))
    unusable: list[int] = []
    identical: list[int] = []
    refusals: list[tuple[int, str]] = []
    n_truncated = n_tokens = 0
    for ex in examples:
        try:
            pair = pair_tokens(tokenizer, ex)
        except Exception as exc:  # the chat template raised on this conversation: a refusal, named by line
            refusals.append((ex.line, template_message(exc)))
            continue
        n_tokens += pair.prompt + pair.chosen + pair.rejected
        if pair.unusable(max_length):
            unusable.append(ex.line)
        elif pair.identical_after_truncation(max_length):
            identical.append(ex.line)
        elif pair.truncated(max_length):
            n_truncated += 1
    if refusals:
        raise DataError(describe_template_refusals(refusals, name))
    if examples and len(unusable) > max_unusable_fraction * len(examples):
        raise DataError(
            f"{name}: {len(unusable)} of {len(examples)} examples have a prompt of {max_length} tokens or more "
            f"(max_length), leaving no room for the reply (lines {describe_lines(unusable)}); "
            "raise max_length or shorten prompts"
        )
    left_out = set(unusable) | set(identical)
    usable = [ex for ex in examples if ex.line not in left_out]
    if not usable:
        raise DataError(
            f"{name}: no pair is left to train on at max_length={max_length}: "
            + describe_left_out(unusable, identical, max_length)
        )
    return PreparedData(
        dataset=_to_dataset(usable),
        n_examples=len(usable),
        n_truncated=n_truncated,
        n_unusable=len(unusable),
        unusable_lines=unusable,
        n_tokens=n_tokens,
        identical_lines=identical,
        text_mode=report.text_mode,
        text_rows=report.text_rows,
    )


def _to_dataset(examples: list[PreferenceExample]) -> Dataset:
    rows: list[dict[str, Any]] = []
    for ex in examples:
        if ex.verbatim and ex.text is not None:
            rows.append({"prompt": ex.text[0], "chosen": ex.text[1], "rejected": ex.text[2]})
        else:
            rows.append({"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected})
    return Dataset.from_list(rows)


def describe_skipped(prepared: PreparedData, max_length: int, name: str = "training file") -> str | None:
    """A warning for the job's events, or None when every example fits."""
    said = describe_left_out(prepared.unusable_lines, prepared.identical_lines, max_length)
    parts = [said] if said else []
    if prepared.n_truncated:
        parts.append(f"{prepared.n_truncated} examples truncated to max_length={max_length}")
    return f"{name}: " + "; ".join(parts) if parts else None
