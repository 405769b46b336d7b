"""Scores of the replies sampled during training: OpenAI's ``string_check``, ``text_similarity`` and
``score_model`` graders (shapes and template variables in ``contracts/graders.py``).

A score is a float, or ``None`` with a reason (a grader model's reply without a number, an endpoint that is
down, a metric library missing on this worker): grading never fails a training run.

``text_similarity`` metrics, each in [0, 1], the reply against the chosen reply:

- ``fuzzy_match``: ``difflib.SequenceMatcher`` ratio of the two stripped strings (Python's standard library);
- ``bleu``: NLTK's ``sentence_bleu`` (4-gram, uniform weights) with smoothing ``method1`` of Chen & Cherry
  (2014), as short replies rarely share a 4-gram; ``gleu``: NLTK's ``sentence_gleu`` (Google-BLEU, Wu et al.
  2016, 1- to 4-grams). Both on NLTK's Treebank-style word tokens (``NLTKWordTokenizer``: no data download);
- ``rouge_1`` .. ``rouge_5``, ``rouge_l``: the F-measure of Google's ``rouge-score`` (ROUGE-N / ROUGE-L,
  its default tokenizer: lower-cased ASCII letters and digits, no stemming).

``score_model`` sends the grader's messages, rendered for the reply and the pair, to ``{IPO_GRADER_BASE_URL}
/chat/completions`` through the ``openai`` client and reads the score from the reply (``parse_score``).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from contracts.graders import (
    Grader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
    render_template,
)

log = logging.getLogger(__name__)

REPLY_IN_REASON_CHARS = 200
"""A grader model's reply is quoted in a reason up to this many characters."""


@dataclass(frozen=True)
class Score:
    """One grade: ``value`` (None when there is none) and ``reason`` (why there is none, or a note such as a
    clamped score)."""

    value: float | None
    reason: str | None = None


@dataclass(frozen=True)
class GraderEndpoint:
    """An OpenAI-compatible API for ``score_model`` graders: ``base_url`` ends before ``/chat/completions``
    (e.g. ``http://host:8000/v1``); from the worker's settings (``worker/settings.py``)."""

    base_url: str
    api_key: str | None = None
    timeout_seconds: float = 60.0


# ---- string_check -------------------------------------------------------------------------------------


def string_check(grader: StringCheckGrader, reply: str, reference: str) -> float:
    """1.0 or 0.0: ``eq``/``ne`` exact comparison, ``like`` reference contained in the reply, ``ilike`` the
    same ignoring case (OpenAI's semantics)."""
    if grader.operation == "eq":
        return float(reply == reference)
    if grader.operation == "ne":
        return float(reply != reference)
    if grader.operation == "like":
        return float(reference in reply)
    return float(reference.lower() in reply.lower())


# ---- text_similarity ----------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    from nltk.tokenize import NLTKWordTokenizer

    return list(NLTKWordTokenizer().tokenize(text))


def _bleu(reply: str, reference: str) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hyp, ref = _words(reply), _words(reference)
    if not hyp or not ref:
        return float(hyp == ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns about missing n-gram orders; smoothing handles them
        return float(sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method1))


def _gleu(reply: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    hyp, ref = _words(reply), _words(reference)
    if not hyp or not ref:
        return float(hyp == ref)
    return float(sentence_gleu([ref], hyp))


@cache
def _rouge_scorer(key: str) -> Any:
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer([key], use_stemmer=False)


def _rouge(key: str) -> Callable[[str, str], float]:
    def score(reply: str, reference: str) -> float:
        return float(_rouge_scorer(key).score(reference, reply)[key].fmeasure)

    return score


TEXT_SIMILARITY: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": lambda reply, reference: difflib.SequenceMatcher(
        None, reply.strip(), reference.strip(), autojunk=False
    ).ratio(),
    "bleu": _bleu,
    "gleu": _gleu,
    **{f"rouge_{n}": _rouge(f"rouge{n}") for n in range(1, 6)},
    "rouge_l": _rouge("rougeL"),
}
"""``evaluation_metric`` -> score(reply, reference) in [0, 1] (the module docstring gives each source)."""


def text_similarity(grader: TextSimilarityGrader, reply: str, reference: str) -> Score:
    """The metric's score; ``None`` with a reason when its library is not installed on this worker."""
    try:
        return Score(round(TEXT_SIMILARITY[grader.evaluation_metric](reply, reference), 6))
    except ImportError as exc:
        return Score(None, f"{grader.evaluation_metric} needs {exc.name} on the worker (the worker extra): {exc}")


# ---- score_model --------------------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_FRACTION = re.compile(rf"({_NUMBER})\s*(?:/|out of)\s*({_NUMBER})", re.IGNORECASE)
_FIRST_NUMBER = re.compile(_NUMBER)
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_score(reply: str, low: float, high: float) -> Score:
    """The score in a grader model's reply, clamped to [low, high]:

    1. a JSON object in the reply (code fences allowed) with a numeric ``score`` or ``result`` (the field
       OpenAI's own score_model output uses);
    2. else the first number; when it reads as a fraction (``7/10``, ``3 out of 5``) it is scaled onto
       [low, high] (``low + 7/10 * (high - low)``).

    No number (or a non-finite one) is ``Score(None, reason)`` quoting the reply; a clamped value carries a
    note."""
    value: float | None = None
    match = _JSON_OBJECT.search(reply)
    if match:
        try:
            obj = json.loads(match.group(0))
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            for key in ("score", "result"):
                v = obj.get(key)
                if isinstance(v, int | float) and not isinstance(v, bool):
                    value = float(v)
                    break
    if value is None:
        first = _FIRST_NUMBER.search(reply)
        fraction = _FRACTION.search(reply)
        if fraction is not None and first is not None and fraction.start() == first.start():
            top, bottom = float(fraction.group(1)), float(fraction.group(2))
            value = low + top / bottom * (high - low) if bottom > 0 else None
        elif first is not None:
            value = float(first.group(0))
    if value is None or not math.isfinite(value):
        return Score(None, f"no score in the grader's reply: {reply[:REPLY_IN_REASON_CHARS]!r}")
    clamped = min(max(value, low), high)
    return Score(clamped, None if clamped == value else f"{value:g} clamped to [{low:g}, {high:g}]")


class EndpointError(Exception):
    """The grader endpoint could not answer (unreachable, timed out, or an HTTP error): the message says
    which; the rest of the round is not sent."""


def _client(endpoint: GraderEndpoint) -> Any:
    from openai import OpenAI

    # The key may be empty for an endpoint without auth; the client insists on a string.
    return OpenAI(
        base_url=endpoint.base_url, api_key=endpoint.api_key or "none", timeout=endpoint.timeout_seconds, max_retries=1
    )


def score_model(client: Any, grader: ScoreModelGrader, values: dict[str, str]) -> Score:
    """One chat completion for the grader's messages rendered with ``values`` (``contracts.graders.
    TEMPLATE_VARIABLES``), parsed by ``parse_score``. Raises ``EndpointError`` when the endpoint fails."""
    import openai

    params = grader.sampling_params
    options: dict[str, Any] = {
        k: v
        for k, v in {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
            "max_completion_tokens": params.max_completions_tokens,
            "reasoning_effort": params.reasoning_effort,
        }.items()
        if v is not None
    }
    messages = [{"role": m.role, "content": render_template(m.content, values)} for m in grader.input]
    try:
        response = client.chat.completions.create(model=grader.model, messages=messages, **options)
    except openai.APIStatusError as exc:
        raise EndpointError(f"the grader endpoint answered {exc.status_code}: {exc.message}"[:500]) from exc
    except openai.APIError as exc:  # connection refused, timeout
        raise EndpointError(f"the grader endpoint is unavailable: {type(exc).__name__}: {exc}"[:500]) from exc
    choices = getattr(response, "choices", None) or []
    text = (choices[0].message.content if choices else None) or ""
    return parse_score(text, grader.range[0], grader.range[1])


# ---- a job's graders ----------------------------------------------------------------------------------


class Graders:
    """A job's graders for one run. ``score(replies, items)`` grades a round of replies: ``items[i]`` holds
    the pair's texts (``prompt``, ``chosen``, ``rejected``), the reference for the similarity graders is
    ``chosen``. Returns per reply ``{grader name: score or None}`` and ``{grader name: reason}`` for those
    with a reason, plus the warnings of the round (one per failing ``score_model`` grader)."""

    def __init__(self, graders: Sequence[Grader], endpoint: GraderEndpoint | None) -> None:
        self.graders = list(graders)
        self.endpoint = endpoint
        self._client: Any = None
        if endpoint is not None and any(isinstance(g, ScoreModelGrader) for g in self.graders):
            self._client = _client(endpoint)

    def startup_warning(self) -> str | None:
        """Said once at the start when score_model graders cannot run (no endpoint configured)."""
        names = [g.name for g in self.graders if isinstance(g, ScoreModelGrader)]
        if names and self.endpoint is None:
            return (
                f"score_model graders {names} have no endpoint on this worker (set IPO_GRADER_BASE_URL and "
                "IPO_GRADER_API_KEY in the worker's environment): their scores are null"
            )
        return None

    def score(
        self, replies: Sequence[str], items: Sequence[dict[str, str]]
    ) -> tuple[list[dict[str, float | None]], list[dict[str, str]], list[str]]:
        scores: list[dict[str, float | None]] = [{} for _ in replies]
        reasons: list[dict[str, str]] = [{} for _ in replies]
        warnings_: list[str] = []
        for grader in self.graders:
            down: str | None = None
            for i, (reply, item) in enumerate(zip(replies, items, strict=True)):
                try:
                    result = self._one(grader, reply, item, down)
                except Exception as exc:  # a grader's bug or a library's surprise: a null score, never a crash
                    log.exception("grader %s failed", grader.name)
                    result = Score(None, f"the grader failed: {type(exc).__name__}: {exc}"[:500])
                if isinstance(result, str):  # the endpoint failed: the rest of the round gets the same reason
                    down = result
                    warnings_.append(f"grader {grader.name}: {result}; its scores this round are null")
                    result = Score(None, result)
                scores[i][grader.name] = result.value
                if result.reason:
                    reasons[i][grader.name] = result.reason
        return scores, reasons, warnings_

    def _one(self, grader: Grader, reply: str, item: dict[str, str], down: str | None) -> Score | str:
        if isinstance(grader, StringCheckGrader):
            return Score(string_check(grader, reply, item["chosen"]))
        if isinstance(grader, TextSimilarityGrader):
            return text_similarity(grader, reply, item["chosen"])
        if down is not None:
            return Score(None, down)
        if self._client is None:
            return Score(None, "no grader endpoint configured on the worker (IPO_GRADER_BASE_URL)")
        values = {"sample.output_text": reply, **{f"item.{k}": v for k, v in item.items()}}
        try:
            return score_model(self._client, grader, values)
        except EndpointError as exc:
            log.warning("grader %s: %s", grader.name, exc)
            return str(exc)
