"""Token lengths of a preference file in a base model's tokens, measured by the API (no torch): does
``max_length`` leave room for a reply after the longest prompt, which pairs become identical once cut,
and does the chat template accept every conversation?

The worker tokenizes each pair as TRL does (``contracts/pair_tokens.py``) and drops examples whose prompt
fills ``max_length`` (TRL would truncate them to nothing) and pairs that are identical after truncation.
Checking at job creation turns those hour-later surprises into a 400 or a job event. The rendering follows
``transformers``' ``apply_chat_template`` (a sandboxed Jinja environment with ``trim_blocks``/
``lstrip_blocks``, special tokens as variables, ``raise_exception``, no special tokens added when encoding)
and text rows used verbatim follow TRL's text path (special tokens added, EOS appended to each reply);
tests/training/test_prompt_lengths.py checks the counts equal the worker's. A model whose tokenizer or
template cannot be read here is left to the worker's own check.
"""

from __future__ import annotations

import json
import logging
import threading
from array import array
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from contracts.chat_templates import (
    SPECIAL_TOKEN_KEYS,
    ChatTemplateError,
    check_template_text,
    model_chat_template,
    read_json,
    special_tokens,
    template_message,
    token_text,
)
from contracts.data_formats import PreferenceExample, parse_preference_file
from contracts.pair_tokens import PairTokens, split_pair

log = logging.getLogger(__name__)

ENCODE_BATCH = 512


class PromptTokenizer:
    """A model directory's fast tokenizer (``tokenizer.json``) and chat template, without transformers.

    ``chat_template``: the template to render with instead of the model's own (a job's
    ``method.<type>.chat_template``); raises ``ValueError`` when there is neither.
    """

    def __init__(self, model_dir: Path, chat_template: str | None = None) -> None:
        self.model_dir = model_dir
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        config = read_json(model_dir / "tokenizer_config.json")
        template = chat_template if chat_template is not None else model_chat_template(model_dir)
        if template is None:
            raise ValueError("the tokenizer has no chat template")
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = _tojson
        self._template = env.from_string(template)
        self._specials = {key: token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        self.special_tokens = special_tokens(model_dir)
        self.eos_token = self._specials["eos_token"]

    def render(self, messages: list[dict[str, str]], *, generation_prompt: bool = True) -> str:
        """Raises ``jinja2.TemplateError`` when the template refuses the conversation."""
        return self._template.render(messages=messages, add_generation_prompt=generation_prompt, **self._specials)

    def count(self, prompts: list[list[dict[str, str]]], *, generation_prompt: bool = True) -> list[int]:
        """Tokens of each conversation as the trainer sees it (a prompt: with the generation prompt)."""
        texts = [self.render(p, generation_prompt=generation_prompt) for p in prompts]
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def pairs(self, examples: list[PreferenceExample]) -> list[PairTokens | str]:
        """Each example's ``PairTokens``, or the template's message when it refuses the conversation."""
        texts: list[str] = []
        verbatim: list[str] = []
        out: list[PairTokens | str] = []
        slots: list[int] = []
        for ex in examples:
            if ex.verbatim and ex.text is not None:
                prompt, chosen, rejected = ex.text
                verbatim += [prompt, prompt + self._with_eos(chosen), prompt + self._with_eos(rejected)]
                slots.append(-1)
                out.append("")
                continue
            try:
                rendered = [
                    self.render(ex.prompt, generation_prompt=True),
                    self.render(ex.prompt + ex.chosen, generation_prompt=False),
                    self.render(ex.prompt + ex.rejected, generation_prompt=False),
                ]
            except Exception as exc:  # the template raised on this conversation: a refusal, reported per line
                out.append(template_message(exc))
                slots.append(-2)
                continue
            texts += rendered
            slots.append(1)
            out.append("")
        templated = iter(self._tokenizer.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        plain = iter(self._tokenizer.encode_batch(verbatim, add_special_tokens=True)) if verbatim else iter(())
        for i, slot in enumerate(slots):
            if slot == -2:
                continue
            source = plain if slot == -1 else templated
            p, c, r = (next(source).ids for _ in range(3))
            out[i] = split_pair(p, c, r)
        return out

    def _with_eos(self, reply: str) -> str:
        """TRL appends EOS to a text reply that does not end with it."""
        eos = self.eos_token
        return reply if not eos or reply.endswith(eos) else reply + eos


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value: object, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False)


@lru_cache(maxsize=16)
def _tokenizer(model_dir: Path, _stamp: float, chat_template: str | None) -> PromptTokenizer | None:
    try:
        return PromptTokenizer(model_dir, chat_template)
    except Exception as exc:  # an unreadable tokenizer: the worker still checks every example
        log.warning("cannot measure prompt lengths for %s at job creation: %s", model_dir.name, exc)
        return None


def tokenizer_for(model_dir: Path, chat_template: str | None = None) -> PromptTokenizer | None:
    try:
        stamp = (model_dir / "tokenizer.json").stat().st_mtime
    except OSError:
        return None
    return _tokenizer(model_dir, stamp, chat_template)


@dataclass
class FileTokens:
    """Every valid example of a file, tokenized as the trainer will (``PairTokens`` as flat arrays)."""

    lines: array[int] = field(default_factory=lambda: array("q"))
    prompt: array[int] = field(default_factory=lambda: array("q"))
    chosen: array[int] = field(default_factory=lambda: array("q"))
    rejected: array[int] = field(default_factory=lambda: array("q"))
    common: array[int] = field(default_factory=lambda: array("q"))
    refusals: list[tuple[int, str]] = field(default_factory=list)
    """(line, the template's message) of conversations the chat template raises on."""
    text_rows: str | None = None
    """What is done with the file's text rows (``TextRowsPlan.describe``), with this model's special tokens."""
    invalid: str | None = None
    """The validator's summary when the file is invalid only with this model's special tokens (a system
    field on text rows that its tokens make verbatim); nothing is measured then."""

    def pair(self, i: int) -> PairTokens:
        return PairTokens(self.prompt[i], self.chosen[i], self.rejected[i], self.common[i])

    def __len__(self) -> int:
        return len(self.lines)


def measure_file(path: Path, tokenizer: PromptTokenizer) -> FileTokens | None:
    """The file's ``FileTokens`` for this tokenizer, or None for an invalid or unreadable file (upload
    validation reports those). Files are immutable once stored, so each file is measured once per
    tokenizer and kept for the next job on it, whatever its ``max_length``."""
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
        measured = _measure(*key)
    with _flights_lock:
        _flights.pop(key, None)
    return measured


_flights: dict[tuple[object, ...], threading.Lock] = {}
_flights_lock = threading.Lock()


@lru_cache(maxsize=32)
def _measure(path: Path, _size: int, _mtime_ns: int, tokenizer: PromptTokenizer, _stamp: int) -> FileTokens | None:
    examples, report = parse_preference_file(path, special_tokens=tokenizer.special_tokens)
    if not report.ok:
        _, plain = parse_preference_file(path, max_errors=1)  # invalid anyway: upload validation said so
        return FileTokens(invalid=report.summary()) if plain.ok else None
    if not examples:
        return None
    out = FileTokens(text_rows=report.text_rows)
    for start in range(0, len(examples), ENCODE_BATCH):
        batch = examples[start : start + ENCODE_BATCH]
        for ex, measured in zip(batch, tokenizer.pairs(batch), strict=True):
            if isinstance(measured, str):
                out.refusals.append((ex.line, measured))
                continue
            out.lines.append(ex.line)
            out.prompt.append(measured.prompt)
            out.chosen.append(measured.chosen)
            out.rejected.append(measured.rejected)
            out.common.append(measured.common)
    return out


UNTRUSTED_TIMEOUT_SECONDS = 60.0
"""How long a job's own Jinja template may take to render every conversation of its files at creation."""
UNTRUSTED_MEMORY_BYTES = 4 << 30
"""Address-space limit of the child process that renders a job's own Jinja template (RLIMIT_AS)."""


def measure_untrusted(model_dir: Path, template: str, paths: dict[str, Path]) -> dict[str, FileTokens | None]:
    """``measure_file`` for each of ``paths`` with a job's own Jinja ``template``, in a child process.

    Jinja's sandbox stops attribute escapes, not work: a template can loop for ever or build a huge
    string. So a user's template is first probed (``check_template_text``) and then renders the files in a
    spawned process with a memory limit, killed after ``UNTRUSTED_TIMEOUT_SECONDS``; the API's own threads
    never run it. Raises ``ChatTemplateError`` for a template that fails the probe, runs out of time or
    memory, or kills its process.
    """
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(1, initializer=_limit_memory, initargs=(UNTRUSTED_MEMORY_BYTES,))
    try:
        pending = pool.apply_async(_measure_in_child, (model_dir, template, paths))
        try:
            result: dict[str, FileTokens | None] | str = pending.get(UNTRUSTED_TIMEOUT_SECONDS)
        except multiprocessing.TimeoutError:
            raise ChatTemplateError(
                f"chat_template took more than {UNTRUSTED_TIMEOUT_SECONDS:.0f}s to render the data files' "
                "conversations; it was stopped"
            ) from None
        except MemoryError:
            raise ChatTemplateError("chat_template ran out of memory rendering the conversations") from None
    finally:
        pool.terminate()
        pool.join()
    if isinstance(result, str):
        raise ChatTemplateError(result)
    return result


def _limit_memory(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _measure_in_child(model_dir: Path, template: str, paths: dict[str, Path]) -> dict[str, FileTokens | None] | str:
    try:
        check_template_text(template)
    except ChatTemplateError as exc:
        return str(exc)
    try:
        tokenizer = PromptTokenizer(model_dir, template)
    except Exception as exc:  # an unreadable tokenizer: the worker still checks every example
        log.warning("cannot measure prompt lengths for %s at job creation: %s", model_dir.name, exc)
        return {name: None for name in paths}
    return {name: _measure.__wrapped__(path, 0, 0, tokenizer, 0) for name, path in paths.items()}


@dataclass(frozen=True)
class LongestPrompt:
    tokens: int
    line: int
    over: tuple[int, ...] = ()
    """Line numbers whose prompt has at least the ``limit`` tokens asked about (first few)."""
    n_over: int = 0


def longest_prompt(measured: FileTokens, limit: int) -> LongestPrompt | None:
    """The longest prompt of a measured file, and the lines whose prompts have ``limit`` tokens or more."""
    if not len(measured):
        return None
    top = max(range(len(measured)), key=lambda i: (measured.prompt[i], -i))
    over = [measured.lines[i] for i in range(len(measured)) if measured.prompt[i] >= limit]
    return LongestPrompt(tokens=measured.prompt[top], line=measured.lines[top], over=tuple(over[:10]), n_over=len(over))


def identical_after_truncation(measured: FileTokens, max_length: int) -> list[int]:
    """Lines whose chosen and rejected replies are the same tokens once cut at ``max_length``."""
    return [measured.lines[i] for i in range(len(measured)) if measured.pair(i).identical_after_truncation(max_length)]


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
    identical_lines: list[int] = field(default_factory=list)
    """Pairs whose replies are the same tokens once cut at ``max_length`` (left out of training)."""
    refusals: list[tuple[int, str]] = field(default_factory=list)
    """(line, message) of conversations the chat template refuses (the job is refused)."""
    text_rows: str | None = None
    invalid: str | None = None
    """The validator's summary when the file is invalid only with this model's special tokens."""

    def summary(self) -> dict[str, object]:
        return {
            "invalid": self.invalid,
            "examples": len(self.prompt) + len(self.refusals),
            "prompt_tokens": percentiles(self.prompt),
            "prompt_plus_reply_tokens": percentiles(self.longest_pair),
            "truncated": len(self.truncated_lines),
            "truncated_lines": self.truncated_lines[:20],
            "unusable": len(self.unusable_lines),
            "unusable_lines": self.unusable_lines[:20],
            "identical_after_truncation": len(self.identical_lines),
            "identical_after_truncation_lines": self.identical_lines[:20],
            "template_refusals": len(self.refusals),
            "template_refusal_lines": [{"line": n, "message": m} for n, m in self.refusals[:20]],
            "text_rows": self.text_rows,
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
    measured = measure_file(path, tokenizer)
    out = LengthReport()
    if measured is None:
        return out
    out.invalid = measured.invalid
    out.refusals = list(measured.refusals)
    out.text_rows = measured.text_rows
    for i in range(len(measured)):
        pair, line = measured.pair(i), measured.lines[i]
        out.prompt.append(pair.prompt)
        out.longest_pair.append(pair.longest)
        if max_length is None:
            continue
        if pair.unusable(max_length):
            out.unusable_lines.append(line)
        elif pair.truncated(max_length):
            out.truncated_lines.append(line)
        if pair.identical_after_truncation(max_length):
            out.identical_lines.append(line)
    return out
