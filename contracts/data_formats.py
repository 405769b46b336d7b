"""Preference-data validator and normaliser: JSONL in, ``PreferenceExample`` list + ``ValidationReport`` out.

Runs in the API at job creation (so bad data is one clear 400 and nothing is queued) and again on the
worker before training, so it is pure stdlib + pydantic. It never raises on bad data: every problem
becomes a ``LineError`` in the report; only OS errors on the path (missing file, permissions) raise.

Accepted shapes (one JSON object per line, blank lines ignored, extra keys tolerated), all normalised to
``prompt`` = messages ending with a user turn and ``chosen``/``rejected`` = the assistant reply messages:

- ``text``: ``{"prompt": str, "chosen": str, "rejected": str}``. The prompt becomes one user message and
  each reply one assistant message; the base model's chat template is applied later, on the worker.
- ``conversational``: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``.
- ``implicit_prompt`` (UltraFeedback-binarized): ``{"chosen": [messages], "rejected": [messages]}``; the
  prompt is their longest common prefix of whole messages and must end with a user turn. A plain-text
  ``"prompt"`` next to message-list replies (as UltraFeedback-binarized has) is ignored, as TRL does.
- ``openai_preference``: ``{"input": {"messages": [...]}, "preferred_output": [...],
  "non_preferred_output": [...]}``; other keys of ``input`` (``tools``, ``parallel_tool_calls``) are ignored.

A message is ``{"role": "system"|"user"|"assistant", "content": str}``; other message keys are dropped.
File-level problems (empty file, too few examples) are reported with ``line == FILE_LEVEL`` (0).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel

Message = dict[str, str]

MAX_LINE_BYTES = 1 << 20
"""A longer line is reported without being decoded or parsed (hostile-input guard)."""
FILE_LEVEL = 0
"""``LineError.line`` of errors about the file as a whole rather than one line."""
FORMATS = ("text", "conversational", "implicit_prompt", "openai_preference")
ROLES = ("system", "user", "assistant")
_SKIP_CHUNK = 1 << 16
_SHAPES: tuple[tuple[str, frozenset[str]], ...] = (
    ("openai_preference", frozenset({"input", "preferred_output", "non_preferred_output"})),
    ("text or conversational", frozenset({"prompt", "chosen", "rejected"})),
    ("implicit_prompt", frozenset({"chosen", "rejected"})),
)
_EXPECTED = (
    'expected {"prompt", "chosen", "rejected"} (text or conversational), {"chosen", "rejected"} '
    '(implicit prompt) or {"input", "preferred_output", "non_preferred_output"} (OpenAI preference)'
)


class LineError(BaseModel):
    line: int
    """1-based line number in the file; ``FILE_LEVEL`` (0) for errors about the whole file."""
    reason: str


class PreferenceExample(BaseModel):
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    line: int
    """1-based line number the example came from (for error messages further down the pipeline)."""


class ValidationReport(BaseModel):
    ok: bool
    n_examples: int
    """Valid examples found (they are returned even when ``ok`` is false)."""
    format: str | None
    """The shape of the first line whose shape was recognised (one of ``FORMATS``), else ``None``."""
    errors: list[LineError]
    """At most ``max_errors`` entries, line errors in file order then the file-level error, if any."""
    error_count: int
    """All errors found, including those not kept in ``errors``."""

    def summary(self, name: str = "training file") -> str:
        """One human-readable message, e.g. for an HTTP 400 body."""
        if self.ok:
            return f"{name} is valid: {self.n_examples} examples (format: {self.format})"
        file_reasons = [e.reason for e in self.errors if e.line == FILE_LEVEL]
        shown = [f"line {e.line}: {e.reason}" for e in self.errors if e.line != FILE_LEVEL]
        n_lines = self.error_count - len(file_reasons)
        if n_lines <= 0:
            return f"{name} is invalid: " + "; ".join(file_reasons)
        parts = shown + ([f"(and {n_lines - len(shown)} more)"] if n_lines > len(shown) else [])
        noun = "line" if n_lines == 1 else "lines"
        return f"{name} has {n_lines} invalid {noun}: " + "; ".join(parts + file_reasons)


class _Bad(Exception):
    """One line's problem; caught per line and turned into a ``LineError``."""


class _TooLong:
    """Stands in for a line over ``MAX_LINE_BYTES``, carrying only its size."""

    def __init__(self, size: int) -> None:
        self.size = size


def parse_preference_lines(
    lines: Iterable[bytes | str], *, min_examples: int = 1, max_errors: int = 20
) -> tuple[list[PreferenceExample], ValidationReport]:
    """Validate and normalise JSONL lines (each item one line, trailing newline optional)."""
    return _scan(enumerate(lines, 1), min_examples=min_examples, max_errors=max_errors)


def parse_preference_file(
    path: str | Path, *, min_examples: int = 1, max_errors: int = 20
) -> tuple[list[PreferenceExample], ValidationReport]:
    """Validate and normalise a JSONL file, streamed line by line (never read whole into memory)."""
    with open(path, "rb") as f:
        return _scan(_bounded_lines(f), min_examples=min_examples, max_errors=max_errors)


def _bounded_lines(f: BinaryIO) -> Iterator[tuple[int, bytes | _TooLong]]:
    """Yield (line number, line); an over-long line is skipped in chunks so it never sits in memory."""
    lineno = 0
    while chunk := f.readline(MAX_LINE_BYTES + 1):
        lineno += 1
        if len(chunk) <= MAX_LINE_BYTES or chunk.endswith(b"\n"):
            yield lineno, chunk
            continue
        size = len(chunk)
        while (rest := f.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
            size += len(rest)
        size += len(rest.rstrip(b"\r\n"))
        yield lineno, _TooLong(size)


def _scan(
    numbered: Iterable[tuple[int, bytes | str | _TooLong]], *, min_examples: int, max_errors: int
) -> tuple[list[PreferenceExample], ValidationReport]:
    if min_examples < 0 or max_errors < 1:
        raise ValueError("min_examples must be >= 0 and max_errors >= 1")
    examples: list[PreferenceExample] = []
    errors: list[LineError] = []
    error_count = 0
    first: tuple[int, str] | None = None  # (line, shape) of the first line whose shape was recognised
    saw_content = False  # any non-blank line, valid or not
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
        del errors[max_errors - 1 :]  # keep room: the file-level error is always shown
        errors.append(LineError(line=FILE_LEVEL, reason=file_error))
    report = ValidationReport(
        ok=error_count == 0,
        n_examples=len(examples),
        format=first[1] if first else None,
        errors=errors,
        error_count=error_count,
    )
    return examples, report


def _load(raw: bytes | str | _TooLong, *, first_line: bool) -> dict[str, object] | None:
    """Decode and parse one line; ``None`` for a blank line."""
    if isinstance(raw, _TooLong):
        raise _Bad(f"line is too long: {raw.size} bytes (limit {MAX_LINE_BYTES}); not parsed")
    if isinstance(raw, bytes):
        if (size := len(raw.rstrip(b"\r\n"))) > MAX_LINE_BYTES:
            raise _Bad(f"line is too long: {size} bytes (limit {MAX_LINE_BYTES}); not parsed")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Bad(f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start}") from None
    else:
        text = raw
        if len(text) > MAX_LINE_BYTES // 4 and len(text.encode("utf-8", "surrogatepass")) > MAX_LINE_BYTES:
            raise _Bad(f"line is too long: more than {MAX_LINE_BYTES} bytes; not parsed")
    if first_line:
        text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark, as some editors write
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Bad(f"malformed JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise _Bad("malformed JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal over Python's digit limit
        raise _Bad(f"malformed JSON: {_clip(str(e), 120)}") from None
    if not isinstance(value, dict):
        raise _Bad(f"expected a JSON object, got {_json_type(value)}")
    return value


def _shape(record: dict[str, object]) -> str:
    keys = record.keys()
    if _SHAPES[0][1] <= keys:
        return "openai_preference"
    if _SHAPES[2][1] <= keys:
        if "prompt" not in keys:
            return "implicit_prompt"
        if isinstance(record["prompt"], str):
            # UltraFeedback-binarized carries a plain-text "prompt" next to full conversations in
            # chosen/rejected; like TRL's maybe_extract_prompt, the conversations win.
            return "implicit_prompt" if isinstance(record["chosen"], list) else "text"
        return "conversational"
    found = sorted(keys)
    shown = ", ".join(json.dumps(_clip(k, 40)) for k in found[:10]) + (", ..." if len(found) > 10 else "")
    name, required = max(_SHAPES, key=lambda s: (len(s[1] & keys), -len(s[1] - keys)))
    hint = ""
    if required & keys:
        missing = ", ".join(json.dumps(k) for k in sorted(required - keys))
        hint = f" (looks like {name} but is missing {missing})"
    raise _Bad(f"unknown shape: found keys [{shown}]{hint}, {_EXPECTED}")


def _normalise(record: dict[str, object], shape: str, lineno: int) -> PreferenceExample:
    if shape == "text":
        for field in ("prompt", "chosen", "rejected"):
            if not isinstance(record[field], str):
                raise _Bad(f"text format: {field} must be a string (got {_json_type(record[field])})")
        prompt = _messages([{"role": "user", "content": record["prompt"]}], "prompt")
        chosen = _messages([{"role": "assistant", "content": record["chosen"]}], "chosen")
        rejected = _messages([{"role": "assistant", "content": record["rejected"]}], "rejected")
    elif shape == "conversational":
        prompt = _messages(record["prompt"], "prompt")
        chosen = _messages(record["chosen"], "chosen")
        rejected = _messages(record["rejected"], "rejected")
    elif shape == "openai_preference":
        given = record["input"]
        if not isinstance(given, dict) or "messages" not in given:
            raise _Bad(f'input must be an object with a "messages" list (got {_json_type(given)})')
        prompt = _messages(given["messages"], "input.messages")
        chosen = _messages(record["preferred_output"], "preferred_output")
        rejected = _messages(record["non_preferred_output"], "non_preferred_output")
    else:
        prompt, chosen, rejected = _split_implicit(record)
    names = ("preferred_output", "non_preferred_output") if shape == "openai_preference" else ("chosen", "rejected")
    prompt_name = "input.messages" if shape == "openai_preference" else "prompt"
    _check_prompt(prompt, prompt_name)
    _check_reply(chosen, names[0])
    _check_reply(rejected, names[1])
    if [(m["role"], m["content"].strip()) for m in chosen] == [(m["role"], m["content"].strip()) for m in rejected]:
        raise _Bad(f"{names[0]} and {names[1]} are identical")
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, line=lineno)


def _split_implicit(record: dict[str, object]) -> tuple[list[Message], list[Message], list[Message]]:
    for field in ("chosen", "rejected"):
        if isinstance(record[field], str):
            hint = "" if "prompt" in record else ' (plain-text replies need a "prompt")'
            raise _Bad(f"implicit prompt: {field} must be a list of messages, got a string{hint}")
    chosen = _messages(record["chosen"], "chosen")
    rejected = _messages(record["rejected"], "rejected")
    if chosen == rejected:
        raise _Bad("chosen and rejected are identical")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise _Bad("implicit prompt: chosen and rejected share no prompt (their first messages differ)")
    if chosen[n - 1]["role"] != "user":
        raise _Bad(
            "implicit prompt: the common prefix of chosen and rejected must end with a user turn "
            f'(its last message, {n}, is "{chosen[n - 1]["role"]}")'
        )
    for field, rest in (("chosen", chosen[n:]), ("rejected", rejected[n:])):
        if not rest:
            raise _Bad(f"{field} is empty: no reply after the shared prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def _messages(value: object, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise _Bad(f"{field} must be a list of messages (got {_json_type(value)})")
    if not value:
        raise _Bad(f"{field} is empty")
    out: list[Message] = []
    for i, msg in enumerate(value, 1):
        where = f"{field} message {i}"
        if not isinstance(msg, dict):
            raise _Bad(f"{where} must be an object (got {_json_type(msg)})")
        for key in ("role", "content"):
            if key not in msg:
                raise _Bad(f'{where} has no "{key}"')
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            shown = json.dumps(_clip(role, 40)) if isinstance(role, str) else _json_type(role)
            raise _Bad(f"{where}: role {shown} is not one of system, user, assistant")
        if not isinstance(content, str):
            raise _Bad(f"{where}: content must be a string (got {_json_type(content)})")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise _Bad(f"{where}: content is not valid Unicode (lone surrogate escape)") from None
        out.append({"role": role, "content": content})
    return out


def _check_prompt(prompt: list[Message], field: str) -> None:
    last = prompt[-1]
    if last["role"] != "user":
        raise _Bad(f'{field} must end with a user turn (its last message is "{last["role"]}")')
    if not last["content"].strip():
        raise _Bad(f"{field} is empty: its last user turn has no text")


def _check_reply(reply: list[Message], field: str) -> None:
    for i, msg in enumerate(reply, 1):
        if msg["role"] != "assistant":
            raise _Bad(f'{field} message {i}: role must be "assistant" (got "{msg["role"]}")')
        if not msg["content"].strip():
            raise _Bad(f"{field} is empty" if len(reply) == 1 else f"{field} message {i} is empty")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
