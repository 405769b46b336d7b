"""Creation-time length and template checks of a supervised file (the twin of ``prompt_lengths`` for
``contracts.sft_formats``): every conversation must render with the job's chat template, and ``max_length``
must leave room for at least one trained token after the context that precedes the first trained reply
(the worker drops examples with none, ``worker/training/sft.py``). Counted with the same
``PromptTokenizer`` as preference prompts (the model's tokens, its chat template, the generation prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from app.errors import InvalidRequest
from app.services.prompt_lengths import PromptTokenizer
from contracts.chat_templates import template_message
from contracts.sft_formats import parse_supervised_file


@dataclass(frozen=True)
class ContextLengths:
    lines: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()
    """Tokens before the first trained token of each conversation (``language_modeling`` rows have none)."""
    refusals: tuple[tuple[int, str], ...] = field(default_factory=tuple)
    """(line, the template's message) of conversations the chat template raises on."""


@lru_cache(maxsize=32)
def _measure(path: Path, _size: int, _mtime_ns: int, tokenizer: PromptTokenizer) -> ContextLengths | None:
    examples, report = parse_supervised_file(path)
    if not report.ok:
        return None
    lines: list[int] = []
    tokens: list[int] = []
    refusals: list[tuple[int, str]] = []
    for ex in examples:
        if ex.messages is None or ex.prompt is None:
            continue
        try:
            tokenizer.render(ex.messages, generation_prompt=False)
            (n,) = tokenizer.count([ex.prompt])
        except Exception as exc:  # the template raised on this conversation: a refusal, reported per line
            refusals.append((ex.line, template_message(exc)))
            continue
        lines.append(ex.line)
        tokens.append(n)
    return ContextLengths(tuple(lines), tuple(tokens), tuple(refusals))


def measure_supervised_file(path: Path, tokenizer: PromptTokenizer) -> ContextLengths | None:
    """The file's context lengths for this tokenizer, or None for an invalid or unreadable file (upload
    validation reports those); measured once per file and tokenizer (files are immutable)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return _measure(path, st.st_size, st.st_mtime_ns, tokenizer)


def check_supervised_file(
    measured: ContextLengths, *, param: str, max_length: int, said: str, max_length_param: str
) -> None:
    """Raises ``InvalidRequest`` for conversations the template refuses, or whose context before the first
    trained reply fills ``max_length`` (lines named, the longest given)."""
    if measured.refusals:
        line, message = measured.refusals[0]
        more = f" (and {len(measured.refusals) - 1} more)" if len(measured.refusals) > 1 else ""
        raise InvalidRequest(
            f"The chat template refuses {len(measured.refusals)} conversation(s) of {param}: line {line}: "
            f"{message}{more}.",
            param=param,
            code="invalid_training_file",
        )
    over = [line for line, n in zip(measured.lines, measured.tokens, strict=True) if n >= max_length]
    if not over:
        return
    top = max(range(len(measured.tokens)), key=lambda i: (measured.tokens[i], -i))
    shown = ", ".join(map(str, over[:10])) + (" and more" if len(over) > 10 else "")
    raise InvalidRequest(
        f"{said} leaves no room for a reply in {len(over)} example(s) of {param} (lines {shown}): the "
        f"conversation before the first trained reply is {max_length} tokens or more; the longest is "
        f"{measured.tokens[top]} tokens (line {measured.lines[top]}). Raise max_length or shorten them.",
        param=max_length_param,
        code="max_length_too_short",
    )
