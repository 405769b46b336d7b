"""Deterministic, real-looking preference dialogues for benchmarks on a real model (``--shape smollm2``).

Nothing is downloaded: conversations are assembled from the small banks below with a seeded
``random.Random``, so the same ``(n_rows, seed)`` always gives the same file. Each row is one pair in TRL's
conversational explicit-prompt format (``prompt`` / ``chosen`` / ``rejected`` message lists, as
``worker/training/demo_data.py`` writes them):

- the prompt: an optional system message, 0-2 earlier user/assistant exchanges, then the user's question;
- chosen: a helpful answer of 1-5 sentences on the question's topic (steps, a reason, a caveat);
- rejected: the unhelpful kind a preference set pairs it with: a curt dismissal, an answer on another
  topic, or a confidently wrong claim, 1-3 sentences.

Lengths therefore vary by row (about 30 to 300 tokens for prompt + the longer reply with SmolLM2's
ChatML template at the defaults; 30 to ~170 with one earlier exchange and three sentences at most, what
``--shape smollm2`` uses), which is what length-grouped batching is for.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

Message = dict[str, str]

SYSTEMS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a friendly support agent for a small online bookshop. Answer clearly and politely.",
    "You are an assistant that helps people plan their week. Keep answers practical.",
    "You are a patient tutor. Explain things step by step.",
)

# topic: (questions, helpful sentences, a wrong claim)
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "bread": (
        (
            "How do I keep home-made bread from going stale so fast?",
            "Why does my sourdough come out flat?",
            "Can I freeze a loaf of bread?",
        ),
        (
            "Let the loaf cool completely before you wrap it, or the trapped steam makes the crust soggy.",
            "Store it cut side down on a wooden board, or in a paper bag for a day or two.",
            "A plastic bag keeps it soft for longer but softens the crust.",
            "Bread freezes well: slice it first, then toast the slices straight from the freezer.",
            "A flat sourdough usually means the starter was not active enough or the dough over-proofed.",
            "Feed the starter the day before and use it when it has doubled.",
            "The fridge dries bread out faster than the counter does, so avoid it.",
        ),
        "Bread lasts longest in the fridge, because cold always stops it going stale.",
    ),
    "bikes": (
        (
            "My bike chain keeps slipping when I pedal hard. What should I check?",
            "How often should I pump up my bike tyres?",
            "What is the easiest way to fix a flat tyre on the road?",
        ),
        (
            "A slipping chain is often a worn chain or cassette, so measure the chain with a checker tool first.",
            "Check that the rear derailleur is indexed: shift through the gears and listen for rattling.",
            "Road tyres lose pressure within a week, so check them before most rides.",
            "The recommended pressure range is printed on the side of the tyre.",
            "Carry a spare tube, two tyre levers and a small pump; swapping the tube is faster than patching.",
            "Run your fingers around the inside of the tyre to find the thorn before you fit the new tube.",
            "Clean and oil the chain every few hundred kilometres, more often in the rain.",
        ),
        "A slipping chain means the tyres are too soft, so pump them up and it will stop.",
    ),
    "email": (
        (
            "How can I write a polite email asking my manager for a day off?",
            "What is a good subject line for a job application email?",
            "How do I follow up on an email that got no reply?",
        ),
        (
            "Keep it short: the date you want off, a one-line reason if you like, and how your work will be covered.",
            "Ask early, ideally a couple of weeks ahead, and offer to hand over anything urgent.",
            "A good subject line names the role and your name, for example 'Application: Data Analyst - Sam Lee'.",
            "Wait three to five working days before following up.",
            "Reply in the same thread so the context is there, and restate your question in one sentence.",
            "End with a clear next step, such as 'Could you let me know by Friday?'.",
        ),
        "Managers prefer long emails, so explain every detail of your plans for the day off.",
    ),
    "plants": (
        (
            "The leaves of my basil plant are turning yellow. What am I doing wrong?",
            "How often should I water a cactus?",
            "Which houseplants do well in a dark room?",
        ),
        (
            "Yellow basil leaves usually mean too much water, so let the top of the soil dry between waterings.",
            "Make sure the pot has drainage holes and never leave it standing in water.",
            "Basil wants at least six hours of light, so a sunny windowsill helps.",
            "Water a cactus only when the soil is completely dry, roughly every two to four weeks.",
            "In winter most cacti need even less water.",
            "Snake plants, ZZ plants and pothos all tolerate low light well.",
        ),
        "Cacti come from the desert, so they need watering every day to make up for the heat.",
    ),
    "python": (
        (
            "How do I read a CSV file in Python?",
            "What is the difference between a list and a tuple in Python?",
            "Why does my Python loop print the same value every time?",
        ),
        (
            "The csv module in the standard library reads it: open the file and pass it to csv.reader.",
            "If you want the header as keys, csv.DictReader gives you one dictionary per row.",
            "For larger tables, pandas.read_csv loads the file into a DataFrame in one line.",
            "A list can be changed after it is made; a tuple cannot, which makes tuples usable as dictionary keys.",
            "Tuples are a little smaller and faster, and they signal that the values belong together.",
            "If a loop prints the same value, check that you use the loop variable and not a name set earlier.",
        ),
        "Lists and tuples are exactly the same in Python; the brackets are only a matter of taste.",
    ),
    "travel": (
        (
            "What should I pack for a three-day hiking trip?",
            "How early should I get to the airport for an international flight?",
            "How can I avoid jet lag?",
        ),
        (
            "Pack layers you can add or remove, a waterproof jacket, and a warm hat even in summer.",
            "Bring a map, a head torch, a first-aid kit and more water than you think you need.",
            "For an international flight, arriving about three hours before departure is the usual advice.",
            "Check in online beforehand so that you only need to drop your bag.",
            "Shift your sleep by an hour a day before you travel, and get daylight when you arrive.",
            "Drink water on the flight and go easy on alcohol and coffee.",
        ),
        "Thirty minutes before an international flight is plenty, since security is always quick.",
    ),
}

DISMISSALS: tuple[str, ...] = (
    "I don't know.",
    "You should look that up yourself.",
    "That is not something I can help with.",
    "It depends.",
)
OPENERS: tuple[str, ...] = ("Good question.", "Happy to help.", "Sure.", "Here is what usually works.")


def _answer(rng: random.Random, sentences: tuple[str, ...], n: int) -> str:
    return " ".join([rng.choice(OPENERS), *rng.sample(sentences, min(n, len(sentences)))])


def _rejected(rng: random.Random, topic: str) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return " ".join(rng.sample(DISMISSALS, rng.randint(1, 2)))
    if kind == 1:  # an answer to another question
        other = rng.choice(sorted(t for t in TOPICS if t != topic))
        return " ".join(rng.sample(TOPICS[other][1], rng.randint(1, 3)))
    return TOPICS[topic][2]


def dialogue_pair(rng: random.Random, max_turns: int = 2, max_sentences: int = 5) -> dict[str, list[Message]]:
    """One preference pair (see the module docstring for its shape), with up to ``max_turns`` earlier
    exchanges and up to ``max_sentences`` sentences in the chosen reply."""
    topic = rng.choice(sorted(TOPICS))
    questions, sentences, _ = TOPICS[topic]
    prompt: list[Message] = []
    if rng.random() < 0.5:
        prompt.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(min(max_turns, rng.choice((0, 0, 1, 2)))):  # earlier exchanges on other topics
        t = rng.choice(sorted(TOPICS))
        prompt.append({"role": "user", "content": rng.choice(TOPICS[t][0])})
        prompt.append({"role": "assistant", "content": _answer(rng, TOPICS[t][1], rng.randint(1, 3))})
    prompt.append({"role": "user", "content": rng.choice(questions)})
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": _answer(rng, sentences, min(max_sentences, rng.randint(1, 5)))}],
        "rejected": [{"role": "assistant", "content": _rejected(rng, topic)}],
    }


def dialogue_rows(n_rows: int, seed: int = 0, max_turns: int = 2, max_sentences: int = 5) -> list[dict[str, Any]]:
    """``n_rows`` pairs from ``random.Random(seed)``: the same arguments always give the same rows."""
    rng = random.Random(seed)
    return [dialogue_pair(rng, max_turns, max_sentences) for _ in range(n_rows)]


def write_dialogue_data(path: Path, n_rows: int, seed: int = 0, max_turns: int = 2, max_sentences: int = 5) -> Path:
    """Write ``dialogue_rows(...)`` as JSONL to ``path`` (parents created); returns ``path``."""
    rows = dialogue_rows(n_rows, seed, max_turns, max_sentences)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
