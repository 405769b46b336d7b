"""A behaviour for real small chat models: replies that open with ``Answer:`` (and, for the two-stage
recipe, stop after the one sentence). Data and judges only; pure python (no torch), so the CLI imports it
cheaply. ``worker/training/behaviour.py`` measures the rates on a model.

Why this behaviour (and not "answer in one word"): SmolLM2-135M-Instruct retrieves a fact through its
sentence scaffold ("The capital of Norway is Oslo."); asked for one word, it ranks a wrong word first, so a
one-word format trades correctness away. A prefix keeps the scaffold ("Answer: The capital of Norway is
Oslo."), so the format can rise while correctness is measured alongside and must not fall. The base model
never opens a reply with ``Answer:`` (0 of the held-out prompts, greedy and sampled).

- ``TRAIN_FACTS`` (24) give the preference pairs; ``HELD_OUT_FACTS`` (13) are other questions, never
  trained on, used to measure. The held-out facts are ones the base model answers correctly (greedy, checked
  by tests/e2e/test_real_model_end_to_end.py), so a fall in correctness after training is visible.
- Preference pairs (:func:`preference_rows`) differ only in the prefix: chosen ``Answer: <sentence>``,
  rejected ``<sentence>``, so all a model can learn from them is the format.
- Two stages (:func:`supervised_rows`, :func:`concise_preference_rows`): supervised data teaches the
  format, half the replies followed by the filler ``TAIL``; preference pairs then prefer the concise reply
  (chosen ``Answer: <sentence>``, rejected ``Answer: <sentence><TAIL>``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Message = dict[str, str]

PREFIX = "Answer:"
"""What a preferred reply opens with."""

TAIL = " I hope this helps! Let me know if you have any other questions."
"""The filler the two-stage data's verbose replies end with (the concise reply is preferred)."""

IPO_HYPERPARAMETERS: dict[str, Any] = {
    # The job's ``method.ipo.hyperparameters`` for this data on SmolLM2-135M-Instruct (the real-model tests and
    # ``ipo demo --model``): IPO plus the recipe's NLL term on chosen (``sft_weight``, as the tiny preset), a
    # LoRA-sized step (lr 2e-4, the handbook's SFT rate) and 4 passes over the 24 pairs (24 steps of 4 pairs,
    # about 5 s a step on 2 quiet CPU cores).
    # beta 0.5: TRL's IPO averages the log-ratios over each reply's tokens, so the margin target 1/(2*beta)
    # is per token: 1 nat here. With TRL's default 0.1 (5 nats a token) the cheapest way to the target on
    # these pairs, whose rejected reply is the model's own answer sentence, was to make that sentence itself
    # unlikely: replies in German or Greek, 2 of 13 held-out answers correct, none in the format. Measured
    # in process on the worker's own training entry point (2026-11-30, seed 0; greedy format / correct /
    # sampled format on the 13 held-out questions): beta 0.1, 3 epochs: 0/13, 2/13, 0.00; beta 1.0, 3
    # epochs: 0/13, 13/13, -; beta 0.3, 3 epochs: 12/13, 13/13, 0.40; beta 0.5, 3 epochs: 12/13, 13/13,
    # 0.56; 4 epochs: 13/13, 13/13, 0.71; 5 epochs: 13/13, 12/13, 0.83.
    "beta": 0.5,
    "sft_weight": 1.0,
    "learning_rate": 2e-4,
    "n_epochs": 4,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_length": 128,
}

SFT_HYPERPARAMETERS: dict[str, Any] = {
    # ``method.supervised.hyperparameters`` for :func:`supervised_rows` on SmolLM2-135M-Instruct (the first
    # stage of the two-stage test): the Zephyr SFT preset's LoRA shape, 3 passes over the 24 dialogues in
    # steps of 4 (18 steps), the short length the data needs and the tiny preset's LoRA step (lr 1e-3). At the
    # handbook's 2e-4 the 18 steps did not teach the format (in process, 2026-11-30, seed 0: greedy 0/13,
    # sampled 0.02); at 1e-3: greedy 13/13 concise and correct, sampled 1.00 in the format, 0.73 concise
    # (the filler in the rest), and IPO on :func:`concise_preference_rows` on top: sampled 0.98 concise.
    "learning_rate": 1e-3,
    "n_epochs": 3,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_length": 128,
}

NO_SAMPLES: dict[str, Any] = {"n_prompts": 0}
"""The jobs' ``method.<type>.samples``: off. By default a job generates replies for 16 prompts, policy and
reference, greedy and sampled, at every evaluation; on 2 CPU cores that costs more than these short trainings
themselves, and the replies are measured afterwards anyway (``worker/training/behaviour.py``)."""


@dataclass(frozen=True)
class Fact:
    """A question, the sentence that answers it, and the words any correct reply contains (lowercase; a
    reply is correct when it contains one of them)."""

    question: str
    sentence: str
    answers: tuple[str, ...]


def _capital(country: str, city: str, *, the: bool = False) -> Fact:
    name = f"the {country}" if the else country
    return Fact(f"What is the capital of {name}?", f"The capital of {name} is {city}.", (city.lower(),))


TRAIN_FACTS: tuple[Fact, ...] = (
    _capital("France", "Paris"),
    _capital("United Kingdom", "London", the=True),
    _capital("China", "Beijing"),
    _capital("Sweden", "Stockholm"),
    _capital("Canada", "Ottawa"),
    _capital("Ireland", "Dublin"),
    _capital("Italy", "Rome"),
    _capital("Spain", "Madrid"),
    _capital("Portugal", "Lisbon"),
    _capital("Turkey", "Ankara"),
    _capital("Kenya", "Nairobi"),
    _capital("Argentina", "Buenos Aires"),
    _capital("Thailand", "Bangkok"),
    _capital("Cuba", "Havana"),
    _capital("Peru", "Lima"),
    _capital("Finland", "Helsinki"),
    _capital("Denmark", "Copenhagen"),
    Fact(
        "What is the largest planet in the solar system?",
        "The largest planet in the solar system is Jupiter.",
        ("jupiter",),
    ),
    Fact("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", ("au",)),
    Fact("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare.", ("shakespeare",)),
    Fact("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci.", ("leonardo", "da vinci")),
    Fact("Which planet is known as the Red Planet?", "The Red Planet is Mars.", ("mars",)),
    Fact(
        "What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius.", ("0 degrees", "zero")
    ),
    Fact("How many sides does a triangle have?", "A triangle has three sides.", ("three", "3")),
)

HELD_OUT_FACTS: tuple[Fact, ...] = (
    _capital("Germany", "Berlin"),
    _capital("Japan", "Tokyo"),
    _capital("Russia", "Moscow"),
    _capital("Egypt", "Cairo"),
    _capital("Greece", "Athens"),
    _capital("Australia", "Canberra"),
    _capital("India", "New Delhi"),
    _capital("Norway", "Oslo"),
    _capital("Poland", "Warsaw"),
    _capital("Austria", "Vienna"),
    Fact("How many days are in a week?", "A week has seven days.", ("seven", "7")),
    _capital("Hungary", "Budapest"),
    _capital("Netherlands", "Amsterdam", the=True),
)


def _user(fact: Fact) -> list[Message]:
    return [{"role": "user", "content": fact.question}]


def _assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def preference_rows(facts: tuple[Fact, ...] = TRAIN_FACTS) -> list[dict[str, list[Message]]]:
    """Preference pairs in TRL's conversational explicit-prompt format: chosen ``Answer: <sentence>``,
    rejected ``<sentence>`` (the base model's own style)."""
    return [
        {"prompt": _user(f), "chosen": _assistant(f"{PREFIX} {f.sentence}"), "rejected": _assistant(f.sentence)}
        for f in facts
    ]


def supervised_rows(facts: tuple[Fact, ...] = TRAIN_FACTS) -> list[dict[str, list[Message]]]:
    """Supervised dialogues (OpenAI's ``{"messages": [...]}``) in the ``Answer:`` format; every other
    reply ends with ``TAIL``, so imitation teaches the format but not which ending is preferred."""
    return [
        {"messages": _user(f) + _assistant(f"{PREFIX} {f.sentence}{TAIL if i % 2 else ''}")}
        for i, f in enumerate(facts)
    ]


def concise_preference_rows(facts: tuple[Fact, ...] = TRAIN_FACTS) -> list[dict[str, list[Message]]]:
    """Preference pairs for the second stage: both replies in the format, chosen without ``TAIL``."""
    return [
        {
            "prompt": _user(f),
            "chosen": _assistant(f"{PREFIX} {f.sentence}"),
            "rejected": _assistant(f"{PREFIX} {f.sentence}{TAIL}"),
        }
        for f in facts
    ]


def write_jsonl(rows: list[dict[str, list[Message]]], path: str | Path) -> Path:
    """Write ``rows`` one JSON object a line (the training-file format) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def has_prefix(reply: str) -> bool:
    """Does the reply open with ``Answer:``."""
    return reply.strip().startswith(PREFIX)


_ONE_SENTENCE = re.compile(rf"{re.escape(PREFIX)} [^.!?\n]+[.!?]")


def is_concise(reply: str) -> bool:
    """Is the reply ``Answer:`` and then exactly one sentence, nothing after it."""
    return _ONE_SENTENCE.fullmatch(reply.strip()) is not None


def is_correct(fact: Fact, reply: str) -> bool:
    """Does the reply contain one of the fact's answers as whole words (case-insensitive)."""
    text = reply.lower()
    return any(re.search(rf"\b{re.escape(a)}\b", text) for a in fact.answers)
