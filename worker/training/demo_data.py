"""Demo preference data: small arithmetic where the preferred reply gives the sum.

Pure python (no torch): the CLI imports this cheaply for ``ipo data demo``.

The task: "What is 3 plus 4?". The preferred reply is "The sum is 7."; the rejected reply misreads the
operator and gives the product instead ("The product is 12."). The tiny model is pre-trained on
dialogues that contain both answers in equal measure (:func:`pretraining_conversations`), so before
alignment it is a real language model that prefers neither (about chance). IPO must shift it towards
the sum, and the shift must
generalise to prompts held out of the preference data (the validation split uses other number pairs).
:func:`judge` checks a *sampled* reply for the preferred behaviour (it states the correct sum).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

Message = dict[str, str]

NUMBERS = range(1, 8)
QUESTION_TEMPLATES: tuple[str, ...] = (
    "What is {a} plus {b}?",
    "How much is {a} plus {b}?",
    "Tell me {a} plus {b}.",
    "Please compute {a} plus {b}.",
)
_PROMPT_RE = re.compile(r"(\d+) plus (\d+)")
_REPLY_RE = re.compile(r"^The sum is (\d+)\.$")


def _pairs() -> list[tuple[int, int]]:
    # Pairs where sum == product (0+0, 2+2) cannot express the preference: chosen would equal rejected.
    return [(a, b) for a in NUMBERS for b in NUMBERS if a + b != a * b]


def split_pairs(seed: int = 0, valid_fraction: float = 0.2) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Number pairs for the train and the held-out validation split (disjoint)."""
    pairs = _pairs()
    random.Random(seed).shuffle(pairs)
    n_valid = max(1, round(len(pairs) * valid_fraction))
    return sorted(pairs[n_valid:]), sorted(pairs[:n_valid])


def reply(a: int, b: int, *, correct: bool) -> str:
    return f"The sum is {a + b}." if correct else f"The product is {a * b}."


def example(a: int, b: int, template: str) -> dict[str, list[Message]]:
    """One preference example in TRL's conversational explicit-prompt format."""
    return {
        "prompt": [{"role": "user", "content": template.format(a=a, b=b)}],
        "chosen": [{"role": "assistant", "content": reply(a, b, correct=True)}],
        "rejected": [{"role": "assistant", "content": reply(a, b, correct=False)}],
    }


def _examples(pairs: list[tuple[int, int]], n: int, rng: random.Random) -> list[dict[str, list[Message]]]:
    grid = [(a, b, t) for a, b in pairs for t in QUESTION_TEMPLATES]
    rng.shuffle(grid)
    out = [example(a, b, t) for a, b, t in grid[:n]]
    while len(out) < n:  # more asked than distinct (pair, template) combinations: repeat
        a, b, t = rng.choice(grid)
        out.append(example(a, b, t))
    return out


def write_demo_data(out_dir: str | Path, n_train: int = 320, n_valid: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``valid.jsonl`` (validation number pairs held out of train)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_pairs, valid_pairs = split_pairs(seed)
    rng = random.Random(seed + 1)
    paths = (out / "train.jsonl", out / "valid.jsonl")
    for path, pairs, n in ((paths[0], train_pairs, n_train), (paths[1], valid_pairs, n_valid)):
        with path.open("w", encoding="utf-8") as f:
            for row in _examples(pairs, n, rng):
                f.write(json.dumps(row) + "\n")
    return paths


def pretraining_conversations(seed: int = 0, repeats: int = 1) -> list[list[Message]]:
    """Dialogues for pre-training the tiny model: every pair and template with both the sum and the
    product. Overall in equal measure, but half the question templates lean 2:1 towards the sum and
    the other half 2:1 towards the product, so the base model's preference varies by prompt (about
    chance over a data set) instead of hinging on one global coin."""
    convs: list[list[Message]] = []
    for _ in range(repeats):
        for a in NUMBERS:
            for b in NUMBERS:
                for i, t in enumerate(QUESTION_TEMPLATES):
                    n_sum = 2 if i % 2 == 0 else 1
                    for correct, count in ((True, n_sum), (False, 3 - n_sum)):
                        convs += [
                            [
                                {"role": "user", "content": t.format(a=a, b=b)},
                                {"role": "assistant", "content": reply(a, b, correct=correct)},
                            ]
                        ] * count
    random.Random(seed).shuffle(convs)
    return convs


def pretraining_corpus(seed: int = 0) -> list[str]:
    """The pre-training dialogues as plain text (one dialogue a string), e.g. to train a tokenizer."""
    return [" ".join(m["content"] for m in conv) for conv in pretraining_conversations(seed)]


def prompt_numbers(prompt_text: str) -> tuple[int, int] | None:
    m = _PROMPT_RE.search(prompt_text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def judge(prompt_text: str, reply_text: str) -> bool:
    """Is ``reply_text`` the preferred behaviour for ``prompt_text``: exactly "The sum is N." with N
    the correct sum of the question's numbers."""
    nums = prompt_numbers(prompt_text)
    m = _REPLY_RE.match(reply_text.strip())
    if nums is None or m is None:
        return False
    return int(m.group(1)) == nums[0] + nums[1]
