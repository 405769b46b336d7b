"""Supervised fine-tuning data: validator and normaliser, JSONL in, ``SupervisedExample`` list + report out.

The supervised twin of ``contracts.data_formats`` (same ``LineError`` / ``ValidationReport``, same line
reading, same guarantees: pure stdlib + pydantic, never raises on bad data, only on OS errors). Runs in the
API at upload and job creation, and again on the worker before training.

Accepted shapes (one JSON object per line, blank lines ignored; one shape per file):

- ``messages`` (OpenAI's supervised chat format, which is also TRL's conversational language-modeling
  shape): ``{"messages": [{"role": ..., "content": ...}, ...]}``. Roles ``system``, ``user``,
  ``assistant``. An assistant message may carry OpenAI's ``"weight": 0`` or ``1``: ``0`` keeps the turn
  as context but takes it out of the loss (OpenAI's documented meaning). The loss covers the assistant
  turns whose weight is 1 (the default), so there must be at least one.
- ``prompt_completion`` (TRL's prompt-completion shape): ``{"prompt": ..., "completion": ...}``, both
  message lists (conversational) or both strings. Strings become one user and one assistant message, as
  the ``text`` preference shape does, so the base model's chat template frames them; the loss covers the
  completion (TRL ``completion_only_loss``).
- ``language_modeling`` (TRL's language-modeling shape): ``{"text": str}``. Plain text, no chat template; the loss
  covers every token (TRL's language modeling, which has no assistant turn to select).

Messages follow the preference validator's rules (``contracts/data_messages.py``: content a string or
OpenAI's text parts; bookkeeping keys ignored), plus the assistant ``weight``. Refused with the reason,
never dropped: non-empty ``tools`` / ``functions`` / ``parallel_tool_calls``, ``tool_calls`` and tool
turns (tool-calling data is not trained on: the chat templates applied here have no tool syntax, and
dropping the calls would train on a conversation the user did not write), any other message key that
carries content, and keys beside the shape's own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from contracts.data_formats import FILE_LEVEL, LineError, ValidationReport, _Bad, _bounded_lines, _load, _TooLong
from contracts.data_messages import clip as _clip
from contracts.data_messages import has_value
from contracts.data_messages import json_type as _json_type
from contracts.data_messages import messages as _plain_messages

SUPERVISED_FORMATS = ("messages", "prompt_completion", "language_modeling")
"""``ValidationReport.format`` of supervised files (distinct from the preference ``FORMATS``: a stored file's
format tells which kind it is)."""
Kind = Literal["preference", "supervised"]
_TOOL_KEYS = ("tools", "functions", "parallel_tool_calls")
_EXPECTED = (
    'expected {"messages"} (OpenAI chat / TRL conversational), {"prompt", "completion"} (TRL prompt-completion) '
    'or {"text"} (TRL language modeling)'
)


class SupervisedExample(BaseModel):
    """One normalised example: a conversation whose ``trained`` messages carry the loss, or plain text."""

    messages: list[dict[str, str]] | None = None
    """``role``/``content`` messages, rendered with the base model's chat template (None for ``text``)."""
    trained: list[bool] | None = None
    """Per message: does its text carry the loss (assistant turns with weight 1)? Same length as messages."""
    text: str | None = None
    """Plain text for the ``language_modeling`` shape (no chat template; every token carries the loss)."""
    line: int

    @property
    def prompt(self) -> list[dict[str, str]] | None:
        """The messages before the first trained turn: the context the first loss token follows (what
        ``max_length`` must leave room after). None for plain text."""
        if self.messages is None or self.trained is None:
            return None
        return self.messages[: self.trained.index(True)]


def training_file_kind(path: str | Path) -> Kind:
    """``supervised`` when the file's first non-blank line is a JSON object with a supervised shape's keys
    (``messages``, ``prompt`` + ``completion``, or ``text``) and none of a preference shape's, else
    ``preference`` (whose validator then reports what is wrong, line by line)."""
    with open(path, "rb") as f:
        for lineno, raw in _bounded_lines(f):
            if isinstance(raw, _TooLong):
                return "preference"
            try:
                record = _load(raw, first_line=lineno == 1)
            except _Bad:
                return "preference"
            if record is None:
                continue
            return "supervised" if _is_supervised(record) else "preference"
    return "preference"


def _is_supervised(record: dict[str, object]) -> bool:
    keys = record.keys()
    if {"chosen", "rejected"} & keys or {"preferred_output", "non_preferred_output"} & keys:
        return False
    return "messages" in keys or {"prompt", "completion"} <= keys or "text" in keys


def parse_supervised_lines(
    lines: Iterable[bytes | str], *, min_examples: int = 1, max_errors: int = 20
) -> tuple[list[SupervisedExample], ValidationReport]:
    """Validate and normalise JSONL lines (each item one line)."""
    return _scan(enumerate(lines, 1), min_examples=min_examples, max_errors=max_errors)


def parse_supervised_file(
    path: str | Path, *, min_examples: int = 1, max_errors: int = 20
) -> tuple[list[SupervisedExample], ValidationReport]:
    """Validate and normalise a JSONL file, streamed line by line. Raises only ``OSError``."""
    with open(path, "rb") as f:
        return _scan(_bounded_lines(f), min_examples=min_examples, max_errors=max_errors)


def _scan(
    numbered: Iterable[tuple[int, bytes | str | _TooLong]], *, min_examples: int, max_errors: int
) -> tuple[list[SupervisedExample], ValidationReport]:
    examples: list[SupervisedExample] = []
    errors: list[LineError] = []
    error_count = 0
    first: tuple[int, str] | None = None
    saw_content = False
    for lineno, raw in numbered:
        try:
            record = _load(raw, first_line=lineno == 1)
            if record is None:
                continue
            saw_content = True
            shape = _shape(record)
            if first is None:
                first = (lineno, shape)
            elif shape != first[1]:
                raise _Bad(f'mixed shapes: line {first[0]} is "{first[1]}" but this line is "{shape}"')
            examples.append(_normalise(record, shape, lineno))
        except _Bad as bad:
            saw_content = True
            error_count += 1
            if len(errors) < max_errors:
                errors.append(LineError(line=lineno, reason=str(bad)))
    file_error = None
    if not saw_content and min_examples > 0:
        file_error = "file is empty: no examples found"
    elif len(examples) < min_examples:
        file_error = f"too few examples: {len(examples)} valid, at least {min_examples} needed"
    if file_error is not None:
        error_count += 1
        del errors[max_errors - 1 :]
        errors.append(LineError(line=FILE_LEVEL, reason=file_error))
    report = ValidationReport(
        ok=error_count == 0,
        n_examples=len(examples),
        format=first[1] if first else None,
        errors=errors,
        error_count=error_count,
    )
    return examples, report


def _shape(record: dict[str, object]) -> str:
    for key in _TOOL_KEYS:
        if has_value(record.get(key)):
            raise _Bad(
                f'"{key}" is not supported for supervised training: tool-calling examples are refused rather '
                "than trained without their tools"
            )
    keys = set(record)
    if "messages" in keys:
        shape, own = "messages", {"messages"}
    elif {"prompt", "completion"} <= keys:
        shape, own = "prompt_completion", {"prompt", "completion"}
    elif "text" in keys:
        shape, own = "language_modeling", {"text"}
    else:
        found = ", ".join(json.dumps(_clip(k, 40)) for k in sorted(keys)[:10])
        hint = ' (a preference example? use method "ipo" or "dpo")' if {"chosen", "rejected"} <= keys else ""
        raise _Bad(f"unknown shape: found keys [{found}]{hint}, {_EXPECTED}")
    extra = sorted(k for k in keys - own if k not in _TOOL_KEYS)  # empty tool keys carry nothing
    if extra:
        shown = ", ".join(json.dumps(_clip(k, 40)) for k in extra[:5])
        raise _Bad(f"{shape} format: unexpected key(s) {shown} next to {', '.join(sorted(own))}")
    return shape


def _normalise(record: dict[str, object], shape: str, lineno: int) -> SupervisedExample:
    if shape == "language_modeling":
        text = record["text"]
        if not isinstance(text, str):
            raise _Bad(f"text must be a string (got {_json_type(text)})")
        if not text.strip():
            raise _Bad("text is empty")
        _check_unicode(text, "text")
        return SupervisedExample(text=text, line=lineno)
    if shape == "messages":
        messages, trained = _messages(record["messages"], "messages")
    else:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            prompt = [{"role": "user", "content": prompt}]
            completion = [{"role": "assistant", "content": completion}]
        elif isinstance(prompt, str) or isinstance(completion, str):
            raise _Bad(
                "prompt and completion must both be strings or both be lists of messages "
                f"(got {_json_type(prompt)} and {_json_type(completion)})"
            )
        p_messages, _ = _messages(prompt, "prompt")
        c_messages, c_trained = _messages(completion, "completion")
        if p_messages[-1]["role"] != "user":
            raise _Bad(f'prompt must end with a user turn (its last message is "{p_messages[-1]["role"]}")')
        for i, msg in enumerate(c_messages, 1):
            if msg["role"] != "assistant":
                raise _Bad(f'completion message {i}: role must be "assistant" (got "{msg["role"]}")')
        messages, trained = p_messages + c_messages, [False] * len(p_messages) + c_trained
    if not any(trained):
        raise _Bad("no assistant turn to train on (every assistant message has weight 0, or there is none)")
    first = trained.index(True)
    if not any(m["role"] == "user" for m in messages[:first]):
        raise _Bad("the first trained assistant turn must follow a user turn")
    return SupervisedExample(messages=messages, trained=trained, line=lineno)


def _messages(value: object, field: str) -> tuple[list[dict[str, str]], list[bool]]:
    """``contracts.data_messages.messages`` (the preference validator's rules: text parts joined, tool turns
    and content-bearing extra keys refused), plus OpenAI's assistant ``weight`` (0 or 1), taken off first."""
    if not isinstance(value, list):
        raise _Bad(f"{field} must be a list of messages (got {_json_type(value)})")
    weights: list[object] = []
    plain: list[object] = []
    for i, msg in enumerate(value, 1):
        if isinstance(msg, dict) and "weight" in msg:
            if msg.get("role") != "assistant":
                raise _Bad(f"{field} message {i}: weight applies to assistant messages only")
            weight = msg["weight"]
            if weight not in (0, 1) or isinstance(weight, bool):
                raise _Bad(f"{field} message {i}: weight must be 0 or 1 (got {_clip(json.dumps(weight), 40)})")
            weights.append(weight)
            plain.append({k: v for k, v in msg.items() if k != "weight"})
        else:
            weights.append(1)
            plain.append(msg)
    out = _plain_messages(plain, field)
    trained = [m["role"] == "assistant" and w == 1 for m, w in zip(out, weights, strict=True)]
    for i, (msg, is_trained) in enumerate(zip(out, trained, strict=True), 1):
        if is_trained and not msg["content"].strip():
            raise _Bad(f"{field} message {i} is an empty assistant reply")
    return out, trained


def _check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Bad(f"{where}: content is not valid Unicode (lone surrogate escape)") from None


def validate_training_file(path: str | Path) -> tuple[Kind, ValidationReport]:
    """Validate a file with the validator its first line calls for (``training_file_kind``): what the API
    runs at upload, so that both preference and supervised files can be uploaded; the job's ``method``
    decides at creation which kind it needs. Raises only ``OSError``."""
    from contracts.data_formats import parse_preference_file

    kind = training_file_kind(path)
    parse = parse_supervised_file if kind == "supervised" else parse_preference_file
    _, report = parse(path)
    return kind, report
