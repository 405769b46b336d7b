"""Graders of the replies sampled during training (the ``graders`` list of the ``samples`` block), in OpenAI's
grader shapes: ``string_check``, ``text_similarity`` and ``score_model``.

OpenAI's graders take templated ``input``/``reference`` strings; here the input is always the sampled reply
(``{{sample.output_text}}``) and the reference the pair's chosen reply, so those two fields are fixed and
left out, except in ``score_model``, whose messages are templates over:

- ``{{sample.output_text}}``: the reply being graded (the policy's or the reference model's greedy reply);
- ``{{item.prompt}}``, ``{{item.chosen}}``, ``{{item.rejected}}``: the pair's prompt (its last message, or a
  text row's prompt) and its chosen and rejected replies, as ``samples.jsonl`` shows them.

Validated at job creation by the API (an unknown template variable or metric is a 400 naming the field);
scored on the worker by ``worker/training/graders.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

GraderName = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StringCheckGrader(_Strict):
    """OpenAI's ``string_check`` grader with its input fixed to the sampled reply and its reference fixed to
    the pair's chosen reply: ``eq``/``ne`` compare them exactly, ``like`` (case-sensitive) and ``ilike``
    (case-insensitive) pass when the reply contains the chosen reply. Scores 1 or 0."""

    type: Literal["string_check"]
    name: GraderName = "string_check"
    """Metric key: ``samples/<name>`` (policy) and ``samples/<name>_reference`` (reference model)."""
    operation: Literal["eq", "ne", "like", "ilike"]


TextSimilarityMetric = Literal[
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "cosine",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
]
TEXT_SIMILARITY_METRICS: tuple[str, ...] = get_args(TextSimilarityMetric)
"""OpenAI's ``evaluation_metric`` values (its API reference lists these eleven)."""

REFUSED_METRICS = {
    "meteor": "meteor is not available here: NLTK's METEOR needs the WordNet corpus, which is a download at run "
    "time (this service downloads nothing); use bleu, gleu, rouge_1..rouge_5, rouge_l or fuzzy_match",
    "cosine": "cosine is not available here: it needs an embeddings model, which this service does not run; use "
    "a score_model grader for semantic similarity, or bleu, gleu, rouge_* or fuzzy_match",
}
"""Metrics named by OpenAI that this service refuses at job creation rather than approximate, and why."""


class TextSimilarityGrader(_Strict):
    """OpenAI's ``text_similarity`` grader (the reply against the chosen reply), scores in [0, 1]; how each
    metric is computed (and with which library) is in ``worker/training/graders.py``. ``meteor`` and
    ``cosine`` are refused (``REFUSED_METRICS`` says why)."""

    type: Literal["text_similarity"]
    name: GraderName = "text_similarity"
    evaluation_metric: TextSimilarityMetric

    @field_validator("evaluation_metric")
    @classmethod
    def _available(cls, metric: str) -> str:
        if metric in REFUSED_METRICS:
            raise ValueError(REFUSED_METRICS[metric])
        return metric


TEMPLATE_VARIABLES = ("sample.output_text", "item.prompt", "item.chosen", "item.rejected")
"""The ``{{ namespace.variable }}`` names a ``score_model`` message may use (OpenAI's namespaces)."""
_TEMPLATE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


def template_variables(text: str) -> list[str]:
    """The variable names of the ``{{ ... }}`` placeholders in ``text``, in order (spaces inside ignored)."""
    return [m.group(1) for m in _TEMPLATE.finditer(text)]


def render_template(text: str, values: Mapping[str, str]) -> str:
    """``text`` with each ``{{ name }}`` replaced by ``values[name]`` (names were checked at job creation;
    an unknown one is left as written). Substituted text is never re-scanned for placeholders."""
    return _TEMPLATE.sub(lambda m: values.get(m.group(1), m.group(0)), text)


class GraderMessage(_Strict):
    """One message of a ``score_model`` grader's ``input`` (OpenAI's eval item: ``role``, ``content``, optional
    ``type: "message"``); ``content`` is a template string (``TEMPLATE_VARIABLES``)."""

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(min_length=1, max_length=20_000)]

    @field_validator("content")
    @classmethod
    def _known_variables(cls, content: str) -> str:
        unknown = [v for v in template_variables(content) if v not in TEMPLATE_VARIABLES]
        if unknown:
            raise ValueError(
                f"unknown template variable {{{{{unknown[0]}}}}}; use one of "
                + ", ".join(f"{{{{{v}}}}}" for v in TEMPLATE_VARIABLES)
            )
        return content


class ScoreModelSamplingParams(_Strict):
    """OpenAI's ``sampling_params`` of a ``score_model`` grader, passed to the chat completions request.
    ``max_completions_tokens`` is OpenAI's spelling in this object (sent as ``max_completion_tokens``)."""

    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None
    seed: StrictInt | None = None
    max_completions_tokens: Annotated[StrictInt, Field(ge=1, le=4096)] | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None


class ScoreModelGrader(_Strict):
    """OpenAI's ``score_model`` grader: ``input`` (templated messages) is sent to ``model`` on an
    OpenAI-compatible chat completions endpoint, and the number in its reply is the score, clamped to
    ``range``. The endpoint (base URL and key) is the worker's setting (``IPO_GRADER_BASE_URL``,
    ``IPO_GRADER_API_KEY``), never part of the job; it may be this service's own ``/v1``."""

    type: Literal["score_model"]
    name: GraderName = "score_model"
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Annotated[list[GraderMessage], Field(min_length=1, max_length=16)]
    range: Annotated[list[StrictFloat], Field(min_length=2, max_length=2)] = Field(default_factory=lambda: [0.0, 1.0])
    """[low, high] (OpenAI's default [0, 1]); scores outside are clamped to it."""
    sampling_params: ScoreModelSamplingParams = Field(default_factory=ScoreModelSamplingParams)

    @field_validator("range")
    @classmethod
    def _ordered(cls, bounds: list[float]) -> list[float]:
        if not bounds[0] < bounds[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {bounds}")
        return bounds

    @model_validator(mode="after")
    def _grades_the_reply(self) -> ScoreModelGrader:
        if not any("sample.output_text" in template_variables(m.content) for m in self.input):
            raise ValueError("no input message uses {{sample.output_text}}: the grader would never see the reply")
        return self


Grader = Annotated[StringCheckGrader | TextSimilarityGrader | ScoreModelGrader, Field(discriminator="type")]
