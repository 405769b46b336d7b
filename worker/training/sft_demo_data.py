"""Demo supervised data for the tiny model: the arithmetic dialogues of ``demo_data`` in OpenAI's supervised
chat format. Pure python (no torch).

Kept out of ``demo_data`` on purpose: the tiny test model's cache key hashes that module (tests/conftest.py),
and supervised data does not change how the model is built.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from worker.training.demo_data import QUESTION_TEMPLATES, reply, split_pairs

SYSTEM_PROMPT = "You answer arithmetic questions."


def write_sft_demo_data(
    out_dir: str | Path, n_train: int = 320, n_valid: int = 64, seed: int = 0, correct_fraction: float = 1.0
) -> tuple[Path, Path]:
    """Write ``sft_train.jsonl`` and ``sft_valid.jsonl`` in OpenAI's supervised chat format
    (``{"messages": [system, user, assistant]}``) over the same number pairs as ``write_demo_data``
    (validation pairs held out). ``correct_fraction`` of the replies give the sum, the rest the product:
    1.0 teaches the preferred behaviour by imitation; 0.5 teaches the dialogue format alone (the first
    stage of the two-stage recipe, where preference optimisation then picks the behaviour)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_pairs, valid_pairs = split_pairs(seed)
    rng = random.Random(seed + 2)
    paths = (out / "sft_train.jsonl", out / "sft_valid.jsonl")
    for path, pairs, n in ((paths[0], train_pairs, n_train), (paths[1], valid_pairs, n_valid)):
        with path.open("w", encoding="utf-8") as f:
            for i in range(n):
                a, b = rng.choice(pairs)
                correct = int((i + 1) * correct_fraction) > int(i * correct_fraction)  # evenly spread, exact count
                messages = [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": rng.choice(QUESTION_TEMPLATES).format(a=a, b=b)},
                    {"role": "assistant", "content": reply(a, b, correct=correct)},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
    return paths
