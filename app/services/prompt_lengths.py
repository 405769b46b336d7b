"""Prompt lengths in a base model's tokens, measured by the API (no torch): does ``max_length`` leave room
for a reply after the longest prompt?

The worker renders each prompt with the model's chat template and ``add_generation_prompt=True`` and
drops examples whose prompt fills ``max_length`` (TRL would truncate them to nothing). Checking at job
creation turns that hour-later surprise into a 400. The rendering follows ``transformers``'
``apply_chat_template`` (a sandboxed Jinja environment with ``trim_blocks``/``lstrip_blocks``, special
tokens as variables, no special tokens added when encoding); tests/training/test_prompt_lengths.py checks
the counts equal the worker's. A model whose tokenizer or template cannot be read here is left to the
worker's own check.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
from array import array
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from contracts.data_formats import parse_preference_file

log = logging.getLogger(__name__)

ENCODE_BATCH = 512
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class LongestPrompt:
    tokens: int
    line: int
    over: tuple[int, ...] = ()
    """Line numbers whose prompt has at least the ``limit`` tokens asked about (first few)."""
    n_over: int = 0


class PromptTokenizer:
    """A model directory's fast tokenizer (``tokenizer.json``) and chat template, without transformers."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        config = _read_json(model_dir / "tokenizer_config.json")
        template_file = model_dir / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        if not isinstance(template, str):
            raise ValueError("the tokenizer has no chat template")
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(template)
        self._specials = {key: _token_text(config.get(key)) for key in _SPECIAL_TOKEN_KEYS}

    def render(self, messages: list[dict[str, str]], *, generation_prompt: bool = True) -> str:
        return self._template.render(messages=messages, add_generation_prompt=generation_prompt, **self._specials)

    def count(self, prompts: list[list[dict[str, str]]], *, generation_prompt: bool = True) -> list[int]:
        """Tokens of each conversation as the trainer sees it (a prompt: with the generation prompt)."""
        texts = [self.render(p, generation_prompt=generation_prompt) for p in prompts]
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


@lru_cache(maxsize=8)
def _tokenizer(model_dir: Path, _stamp: float) -> PromptTokenizer | None:
    try:
        return PromptTokenizer(model_dir)
    except Exception as exc:  # an unreadable tokenizer: the worker still checks every example
        log.warning("cannot measure prompt lengths for %s at job creation: %s", model_dir.name, exc)
        return None


def tokenizer_for(model_dir: Path) -> PromptTokenizer | None:
    try:
        stamp = (model_dir / "tokenizer.json").stat().st_mtime
    except OSError:
        return None
    return _tokenizer(model_dir, stamp)


def longest_prompt(path: Path, tokenizer: PromptTokenizer, limit: int) -> LongestPrompt | None:
    """The longest prompt of a (valid) preference file, and the lines whose prompts have ``limit`` tokens
    or more. None for an empty or invalid file (upload validation reports those).

    Files are immutable once stored, so each file's prompt lengths are measured once per tokenizer and
    kept (sorted, as two flat arrays) for the next job on it, whatever its ``max_length``.
    """
    try:
        st = path.stat()
        stamp = (tokenizer.model_dir / "tokenizer.json").stat().st_mtime_ns
    except OSError:
        return None
    key = (path, st.st_size, st.st_mtime_ns, tokenizer, stamp)
    # Single flight: concurrent job creations on one new file wait for one measurement, not one each.
    with _flights_lock:
        flight = _flights.setdefault(key, threading.Lock())
    with flight:
        measured = _sorted_prompt_lengths(*key)
    with _flights_lock:
        _flights.pop(key, None)
    if measured is None:
        return None
    lengths, lines = measured
    n_over = bisect.bisect_left(lengths, -limit + 1)  # lengths are negated: descending order
    over = sorted(lines[:n_over])[:10]
    return LongestPrompt(tokens=-lengths[0], line=lines[0], over=tuple(over), n_over=n_over)


_flights: dict[tuple[object, ...], threading.Lock] = {}
_flights_lock = threading.Lock()


@lru_cache(maxsize=32)
def _sorted_prompt_lengths(
    path: Path, _size: int, _mtime_ns: int, tokenizer: PromptTokenizer, _stamp: int
) -> tuple[array[int], array[int]] | None:
    """(negated prompt lengths, line numbers), longest first; ties keep file order."""
    examples, report = parse_preference_file(path)
    if not report.ok or not examples:
        return None
    measured: list[tuple[int, int]] = []
    for start in range(0, len(examples), ENCODE_BATCH):
        batch = examples[start : start + ENCODE_BATCH]
        counts = tokenizer.count([ex.prompt for ex in batch])
        measured += [(-n, ex.line) for ex, n in zip(batch, counts, strict=True)]
    measured.sort()
    return array("q", (n for n, _ in measured)), array("q", (line for _, line in measured))


@dataclass
class LengthReport:
    """Token lengths of a file's examples for one model (``ipo data validate --model``)."""

    prompt: list[int] = field(default_factory=list)
    """Prompt tokens per example, generation prompt included."""
    longest_pair: list[int] = field(default_factory=list)
    """max(prompt + chosen, prompt + rejected) tokens per example: what must fit ``max_length``."""
    truncated_lines: list[int] = field(default_factory=list)
    """Examples whose prompt + reply exceeds ``max_length`` (the reply is cut)."""
    unusable_lines: list[int] = field(default_factory=list)
    """Examples whose prompt alone fills ``max_length`` (no room for any reply: the job is refused)."""

    def summary(self) -> dict[str, object]:
        return {
            "examples": len(self.prompt),
            "prompt_tokens": percentiles(self.prompt),
            "prompt_plus_reply_tokens": percentiles(self.longest_pair),
            "truncated": len(self.truncated_lines),
            "truncated_lines": self.truncated_lines[:20],
            "unusable": len(self.unusable_lines),
            "unusable_lines": self.unusable_lines[:20],
        }


def percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"min": ordered[0], "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


def length_report(path: Path, tokenizer: PromptTokenizer, max_length: int | None) -> LengthReport:
    """Token lengths of every example of a valid preference file, and what ``max_length`` would cut."""
    examples, report = parse_preference_file(path)
    out = LengthReport()
    if not report.ok:
        return out
    for start in range(0, len(examples), ENCODE_BATCH):
        batch = examples[start : start + ENCODE_BATCH]
        prompts = tokenizer.count([ex.prompt for ex in batch])
        chosen = tokenizer.count([ex.prompt + ex.chosen for ex in batch], generation_prompt=False)
        rejected = tokenizer.count([ex.prompt + ex.rejected for ex in batch], generation_prompt=False)
        for ex, p, c, r in zip(batch, prompts, chosen, rejected, strict=True):
            out.prompt.append(p)
            out.longest_pair.append(max(c, r))
            if max_length is not None and p >= max_length:
                out.unusable_lines.append(ex.line)
            elif max_length is not None and max(c, r) > max_length:
                out.truncated_lines.append(ex.line)
    return out
