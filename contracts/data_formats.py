"""Preference-data validator and normaliser: JSONL in, ``PreferenceExample`` list + ``ValidationReport`` out.

Runs in the API at job creation (so bad data is one clear 400 and nothing is queued) and again on the
worker before training, so it is pure stdlib + pydantic. It never raises on bad data: every problem
becomes a ``LineError`` in the report; only OS errors on the path (missing file, permissions) raise.

Accepted shapes (one JSON object per line, blank lines ignored, bookkeeping keys tolerated), all normalised
to ``prompt`` = messages ending with a user turn and ``chosen``/``rejected`` = the assistant reply messages:

- ``text``: ``{"prompt": str, "chosen": str, "rejected": str}``. The prompt becomes one user message and
  each reply one assistant message, templated on the worker; or, when the file's text rows carry chat
  markup, the strings are used verbatim (``contracts/text_rows.py``; ``PreferenceExample.verbatim``).
- ``text_implicit_prompt``: ``{"chosen": str, "rejected": str}`` (raw Anthropic HH); the prompt is their
  common prefix, split like TRL's ``extract_prompt``; always verbatim.
- ``conversational``: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``.
- ``implicit_prompt`` (UltraFeedback-binarized): ``{"chosen": [messages], "rejected": [messages]}``; the
  prompt is their longest common prefix of whole messages and must end with a user turn. A plain-text
  ``"prompt"`` next to message-list replies (as UltraFeedback-binarized has) is ignored, as TRL does.
- ``openai_preference``: ``{"input": {"messages": [...]}, "preferred_output": [...],
  "non_preferred_output": [...]}``; ``parallel_tool_calls`` is ignored, non-empty ``tools`` refuse the line.
- ``sharegpt``: LLaMA-Factory's ``{"conversations": [{"from", "value"}...], "chosen": {...}, "rejected": {...}}``.

A message is ``{"role": "system"|"user"|"assistant", "content": str | [text parts]}``; what else it may
carry, and what refuses a line instead of being dropped, is in ``contracts/data_records.py``.
File-level problems (empty file, too few examples, a JSON array, UTF-16/UTF-32) are reported with
``line == FILE_LEVEL`` (0); a file that is not JSON Lines as a whole gets that one reason only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel

from contracts.data_records import SHAPES, BadLine, Message, clip, json_type, normalise, shape_of
from contracts.text_rows import TextMode, plan_text_rows

__all__ = ["FILE_LEVEL", "FORMATS", "LineError", "Message", "PreferenceExample", "ValidationReport"]

MAX_LINE_BYTES = 1 << 20
"""A longer line is reported without being decoded or parsed (hostile-input guard)."""
FILE_LEVEL = 0
"""``LineError.line`` of errors about the file as a whole rather than one line."""
FORMATS = SHAPES
"""Recognised shapes: text, conversational, implicit_prompt, text_implicit_prompt, openai_preference, sharegpt."""
_SKIP_CHUNK = 1 << 16
_ARRAY_PEEK_BYTES = 1 << 20
"""How much of a JSON-array file is read to name the shape of its first record."""
_SHAPE_NAMES = {
    "openai_preference": "OpenAI preference",
    "sharegpt": "ShareGPT (LLaMA-Factory) preference",
    "text": "text prompt/chosen/rejected",
    "conversational": "conversational prompt/chosen/rejected",
    "implicit_prompt": "implicit-prompt chosen/rejected",
    "text_implicit_prompt": "implicit-prompt text chosen/rejected",
}


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
    text: tuple[str, str, str] | None = None
    """A text row's (prompt, chosen, rejected) strings as given; None for message rows."""
    system: str | None = None
    """The record's top-level ``system`` field (already the first message of ``prompt``)."""
    text_implicit: bool = False
    """A text row whose prompt was split off implicit chosen/rejected transcripts (always verbatim)."""
    verbatim: bool = False
    """Train on ``text`` as written (TRL's standard text format) instead of templating the messages
    (``contracts/text_rows.py`` decides, once per file)."""


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
    text_mode: TextMode | None = None
    """What is done with text rows: ``chat_template`` or ``verbatim`` (None: no text rows)."""
    text_rows: str | None = None
    """That decision in words, with the lines that made it (``TextRowsPlan.describe``)."""

    def summary(self, name: str = "training file") -> str:
        """One human-readable message, e.g. for an HTTP 400 body."""
        if self.ok:
            said = f"{name} is valid: {self.n_examples} examples (format: {self.format})"
            return said + (f"; {self.text_rows}" if self.text_rows else "")
        file_reasons = [e.reason for e in self.errors if e.line == FILE_LEVEL]
        shown = [f"line {e.line}: {e.reason}" for e in self.errors if e.line != FILE_LEVEL]
        n_lines = self.error_count - len(file_reasons)
        if n_lines <= 0:
            return f"{name} is invalid: " + "; ".join(file_reasons)
        parts = shown + ([f"(and {n_lines - len(shown)} more)"] if n_lines > len(shown) else [])
        noun = "line" if n_lines == 1 else "lines"
        return f"{name} has {n_lines} invalid {noun}: " + "; ".join(parts + file_reasons)


_Bad = BadLine


class _TooLong:
    """Stands in for a line over ``MAX_LINE_BYTES``, carrying only its size and first bytes (a binary
    file's signature)."""

    def __init__(self, size: int, head: bytes = b"") -> None:
        self.size = size
        self.head = head


def parse_preference_lines(
    lines: Iterable[bytes | str],
    *,
    min_examples: int = 1,
    max_errors: int = 20,
    special_tokens: Sequence[str] = (),
) -> tuple[list[PreferenceExample], ValidationReport]:
    """Validate and normalise JSONL lines (each item one line, trailing newline optional).

    ``special_tokens``: the base model's special tokens, when known: text rows holding one are used
    verbatim (``contracts/text_rows.py``).
    """
    return _scan(enumerate(lines, 1), min_examples=min_examples, max_errors=max_errors, special_tokens=special_tokens)


def parse_preference_file(
    path: str | Path, *, min_examples: int = 1, max_errors: int = 20, special_tokens: Sequence[str] = ()
) -> tuple[list[PreferenceExample], ValidationReport]:
    """Validate and normalise a JSONL file, streamed line by line (never read whole into memory).

    A file that is not JSON Lines as a whole (UTF-16/UTF-32, a JSON array) gets one file-level error that
    says what to do, not an error per line.
    """
    with open(path, "rb") as f:
        return _scan(_bounded_lines(f), min_examples=min_examples, max_errors=max_errors, special_tokens=special_tokens)


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
        yield lineno, _TooLong(size, chunk[:16])


def _scan(
    numbered: Iterable[tuple[int, bytes | str | _TooLong]],
    *,
    min_examples: int,
    max_errors: int,
    special_tokens: Sequence[str] = (),
) -> tuple[list[PreferenceExample], ValidationReport]:
    if min_examples < 0 or max_errors < 1:
        raise ValueError("min_examples must be >= 0 and max_errors >= 1")
    examples: list[PreferenceExample] = []
    errors: list[LineError] = []
    error_count = 0
    first: tuple[int, str] | None = None  # (line, shape) of the first line whose shape was recognised
    saw_content = False  # any non-blank line, valid or not
    lines = iter(numbered)
    for lineno, raw in lines:
        if not saw_content:
            whole = _whole_file_problem(raw, lines)
            if whole is not None:
                error = LineError(line=FILE_LEVEL, reason=whole)
                return [], ValidationReport(ok=False, n_examples=0, format=None, errors=[error], error_count=1)
        try:
            record = _load(raw, first_line=lineno == 1)
            if record is None:
                continue
            saw_content = True
            shape = shape_of(record)
            if first is None:
                first = (lineno, shape)
            elif shape != first[1]:
                raise _Bad(f'mixed shapes: line {first[0]} is "{first[1]}" but this line is "{shape}"')
            done = normalise(record, shape)
            examples.append(
                PreferenceExample(
                    prompt=done.prompt,
                    chosen=done.chosen,
                    rejected=done.rejected,
                    line=lineno,
                    text=done.text,
                    system=done.system,
                    text_implicit=shape == "text_implicit_prompt",
                )
            )
        except _Bad as bad:
            saw_content = True
            error_count += 1
            if len(errors) < max_errors:
                errors.append(LineError(line=lineno, reason=str(bad)))
    plan = plan_text_rows(examples, special_tokens)
    if plan.refused:
        refused = {line for line, _ in plan.refused}
        examples = [ex for ex in examples if ex.line not in refused]
        error_count += len(plan.refused)
        errors = sorted(errors + [LineError(line=n, reason=r) for n, r in plan.refused], key=lambda e: e.line)
        del errors[max_errors:]
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
        text_mode=plan.mode,
        text_rows=plan.describe(),
    )
    return examples, report


_UTF16_FIX = (
    "save it as UTF-8 (PowerShell: `Get-Content IN | Set-Content -Encoding utf8 OUT`; "
    "elsewhere: `iconv -f UTF-16 -t UTF-8 IN > OUT`)"
)


def _whole_file_problem(raw: bytes | str | _TooLong, rest: Iterator[tuple[int, bytes | str | _TooLong]]) -> str | None:
    """The reason a file is not JSON Lines as a whole, judged on its first non-blank line, or None.

    Binary files by signature (``_BINARY``: compressed, archives, Parquet, Arrow), UTF-16 and UTF-32 (by
    byte-order mark, or NUL bytes in the first line), a CSV/TSV header naming ``chosen`` and ``rejected``,
    and a JSON array (the first line starts with ``[``; up to ``_ARRAY_PEEK_BYTES`` more are read to name
    its records' shape)."""
    head = raw.head if isinstance(raw, _TooLong) else raw[:16] if isinstance(raw, bytes) else b""
    for magic, what in _BINARY:
        if head.startswith(magic):
            return f"the file is {what}, not JSON Lines"
    if isinstance(raw, _TooLong):
        return None
    if isinstance(raw, bytes):
        if raw.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
            return "the file is UTF-32 encoded (it starts with a UTF-32 byte-order mark), not UTF-8: " + _UTF16_FIX
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            return (
                "the file is UTF-16 encoded (it starts with a UTF-16 byte-order mark, as Windows PowerShell "
                "writes by default), not UTF-8: " + _UTF16_FIX
            )
        if b"\x00" in raw:
            return "the file holds NUL bytes: it looks UTF-16 or UTF-32 encoded, not UTF-8: " + _UTF16_FIX
        text = raw.decode("utf-8", errors="replace")
    else:
        text = raw
    text = text.removeprefix("\ufeff").lstrip()
    if not text.startswith("["):
        return _csv_header(text)
    record = _first_array_record(text, rest)
    said = (
        'the file is one JSON array (it starts with "["), not JSON Lines (one JSON object per line): '
        "write each record on its own line, e.g. `jq -c '.[]' FILE.json > FILE.jsonl`"
    )
    if not isinstance(record, dict):
        return said
    try:
        shape = shape_of(record)
    except BadLine as bad:
        return f"{said}. Its first record: {bad}"
    return f"{said}. Its records have the {_SHAPE_NAMES.get(shape, shape)} shape, which is accepted one per line"


_TO_JSONL = "pandas.read_{}(PATH).to_json(OUT, orient='records', lines=True, force_ascii=False)"
_BINARY: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip-compressed: decompress it first (`gunzip FILE.jsonl.gz`)"),
    (b"PK\x03\x04", "a ZIP archive (or an Excel workbook): extract the JSON Lines file from it first"),
    (b"PAR1", "a Parquet file (as Hugging Face datasets ship): convert it, e.g. " + _TO_JSONL.format("parquet")),
    (b"BZh", "bzip2-compressed: decompress it first (`bunzip2 FILE.jsonl.bz2`)"),
    (b"\xfd7zXZ\x00", "xz-compressed: decompress it first (`unxz FILE.jsonl.xz`)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it first (`unzstd FILE.jsonl.zst`)"),
    (b"ARROW1", "an Arrow file: convert it to JSON Lines first"),
)
"""Signatures of binary files people upload instead of JSON Lines, and what to do."""


def _csv_header(text: str) -> str | None:
    """A CSV/TSV header naming the pair's columns (``prompt,chosen,rejected``): one reason for the file."""
    if text.startswith("{"):
        return None
    first = text.split("\n", 1)[0].strip()
    for sep, name, reader in ((",", "CSV", "csv"), ("\t", "TSV", "csv")):
        fields = [f.strip().strip('"').strip().lower() for f in first.split(sep)]
        if len(fields) >= 2 and {"chosen", "rejected"} <= set(fields):
            shown = ", ".join(fields[:6]) + (", ..." if len(fields) > 6 else "")
            how = (
                _TO_JSONL.format(reader)
                if sep == ","
                else _TO_JSONL.format(reader).replace("(PATH)", "(PATH, sep='\\t')")
            )
            return f"the file is {name} with a header ({shown}), not JSON Lines: convert it, e.g. {how}"
    return None


def _first_array_record(text: str, rest: Iterator[tuple[int, bytes | str | _TooLong]]) -> object:
    """The first element of the JSON array that starts ``text`` (reading on from ``rest``), or None.

    Decoding is retried each time the buffer doubles (and once at the end), so reading up to
    ``_ARRAY_PEEK_BYTES`` costs a few passes over it, not one per line."""
    decoder = json.JSONDecoder()
    buffer, next_try, done = text, 0, False
    while True:
        if len(buffer) >= next_try or done:
            start = len(buffer) - len(buffer[1:].lstrip())
            try:
                return decoder.raw_decode(buffer, start)[0]
            except (ValueError, RecursionError):
                next_try = max(4096, 2 * len(buffer))
        if done or len(buffer) > _ARRAY_PEEK_BYTES:
            return None
        nxt = next(rest, None)
        if nxt is None or isinstance(nxt[1], _TooLong):
            done = True
            continue
        piece = nxt[1]
        buffer += piece.decode("utf-8", errors="replace") if isinstance(piece, bytes) else piece + "\n"


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
        raise _Bad(f"malformed JSON: {clip(str(e), 120)}") from None
    if not isinstance(value, dict):
        raise _Bad(f"expected a JSON object, got {json_type(value)}")
    return value
