"""Prompts held out of the training file for samples, when a job has no validation file (``samples.holdout``).

Samples of prompts the policy trains on say little about what it learned, so without a validation file the
worker sets a few training prompts aside before anything else reads the file: chosen at random with the
job's seed (the same on every attempt, so a resumed run trains on the same pairs), each with all of its
pairs (a prompt seen in training is not held out). The training file is then the rest, written next to the
held-out lines in the attempt's directory, and the job's events say how many and which lines.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from contracts.data_formats import PreferenceExample, parse_preference_file
from contracts.method import Samples
from worker.training.recipe import ConfigError
from worker.training.reporter import Reporter
from worker.training.request import TrainRequest

AUTO_SHARE = 10
"""``holdout: auto`` holds out at most one prompt in this many (a tenth), so training keeps 90% or more."""


@dataclass(frozen=True)
class Holdout:
    """``lines``: 1-based lines of the training file held out (all pairs of ``n_prompts`` prompts);
    ``train_file``: the training file without them; ``samples_file``: those lines, for the samples."""

    lines: list[int]
    n_prompts: int
    n_kept: int
    train_file: Path
    samples_file: Path

    def describe(self) -> str:
        shown = ", ".join(map(str, self.lines[:50])) + (", ..." if len(self.lines) > 50 else "")
        return (
            f"samples: {self.n_prompts} prompts ({len(self.lines)} pairs) held out of the training file for samples, "
            f"as there is no validation file (samples.holdout; 0 trains on every pair); training on the other "
            f"{self.n_kept} pairs. Held-out lines: {shown}"
        )


def prompt_key(example: PreferenceExample) -> str:
    """What makes two pairs share a prompt (their prompt messages, or a text row's prompt)."""
    return json.dumps([example.prompt, example.text and example.text[0]], sort_keys=True)


def hold_out(
    train_file: str, examples: Sequence[PreferenceExample], config: Samples, *, seed: int, out_dir: Path
) -> Holdout | None:
    """The prompts held out for ``config`` (None when none are: ``n_prompts`` or ``holdout`` 0, or ``auto``
    on fewer than ``AUTO_SHARE`` distinct prompts). Writes ``out_dir/train.jsonl`` and
    ``out_dir/samples.jsonl`` (the original lines, byte for byte). Raises ``ConfigError`` when an explicit
    ``holdout`` leaves no prompt to train on. ``examples`` are the file's, validated."""
    if config.n_prompts == 0 or config.holdout == 0:
        return None
    keys: list[str] = []
    lines_of: dict[str, list[int]] = {}
    for ex in examples:
        key = prompt_key(ex)
        if key not in lines_of:
            keys.append(key)
            lines_of[key] = []
        lines_of[key].append(ex.line)
    if config.holdout == "auto":
        count = min(config.n_prompts, len(keys) // AUTO_SHARE)
    else:
        count = config.holdout
        if count >= len(keys):
            raise ConfigError(
                "samples.holdout",
                f"holds out {count} prompts but the training file has {len(keys)} distinct prompts; leave at "
                "least one to train on, or give a validation_file",
            )
    if count == 0:
        return None
    chosen = random.Random(seed).sample(range(len(keys)), count)
    held = sorted(line for i in chosen for line in lines_of[keys[i]])
    out_dir.mkdir(parents=True, exist_ok=True)
    train_out, samples_out = out_dir / "train.jsonl", out_dir / "samples.jsonl"
    held_set = set(held)
    with open(train_file, "rb") as src, train_out.open("wb") as train, samples_out.open("wb") as samples:
        for number, line in enumerate(src, 1):  # the validator's 1-based physical line numbers
            (samples if number in held_set else train).write(line if line.endswith(b"\n") else line + b"\n")
    return Holdout(held, count, len(examples) - len(held), train_out, samples_out)


def hold_out_for_samples(
    request: TrainRequest, reporter: Reporter, specials: tuple[str, ...], out: Path
) -> tuple[TrainRequest, Holdout | None]:
    """Without a validation file, the request training on the training file less the prompts held out for
    samples (``worker/training/holdout.py``), and the file of those prompts; else the request unchanged and
    None. An invalid training file is left for ``run._resolve`` to report."""
    config = request.method.params().samples
    if not request.method.is_preference or config.n_prompts == 0:
        return request, None
    if request.validation_file:
        if isinstance(config.holdout, int) and config.holdout > 0:
            reporter.event("samples.holdout is ignored: samples come from the validation file")
        return request, None
    examples, report = parse_preference_file(request.train_file, special_tokens=specials)
    if not report.ok:
        return request, None
    held = hold_out(request.train_file, examples, config, seed=request.seed, out_dir=out / "holdout")
    if held is None:
        return request, None
    reporter.event(
        held.describe(),
        data={"samples_holdout": {"prompts": held.n_prompts, "pairs": len(held.lines), "lines": held.lines}},
    )
    return request.model_copy(update={"train_file": str(held.train_file)}), held
