"""How often a (base, or base + one or more adapters) model shows the ``Answer:`` behaviour of
``answer_format`` on held-out questions, and whether it stays correct.

``python -m worker.training.behaviour --model DIR [--adapter DIR ...] [--samples N] [--json]``

For each held-out question: one greedy reply (the model's mode: format, conciseness and correctness) and
``samples`` replies sampled at temperature 1 (``evaluate.sample_replies``: the model's distribution, the
format rate). Used by the real-model tests (tests/e2e/test_real_model_end_to_end.py) and
``ipo demo --model smollm2-135m-instruct``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from worker.training.answer_format import HELD_OUT_FACTS, Fact, has_prefix, is_concise, is_correct
from worker.training.evaluate import sample_replies

MAX_NEW_TOKENS = 32
"""Long enough for ``Answer:``, the sentence and the start of any filler after it."""


@dataclass
class BehaviourReport:
    """Rates in [0, 1] over ``n_prompts`` held-out questions (greedy) and ``n_samples`` sampled replies."""

    n_prompts: int
    n_samples: int
    prefix_rate: float
    """Greedy replies opening with ``Answer:``."""
    concise_rate: float
    """Greedy replies that are ``Answer:`` and one sentence, nothing after."""
    correct_rate: float
    """Greedy replies containing the right answer."""
    sampled_prefix_rate: float
    sampled_concise_rate: float
    examples: list[dict[str, Any]] = field(default_factory=list)
    """Every greedy reply: ``{"prompt", "reply", "prefix", "concise", "correct"}``."""


def measure(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    facts: tuple[Fact, ...] = HELD_OUT_FACTS,
    *,
    samples: int = 4,
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> BehaviourReport:
    """Greedy and sampled replies to every fact's question (chat template applied, no system message).
    Sampling is seeded (``torch.manual_seed(seed)`` once), so a model gives the same figures each run on
    the same machine."""
    model.eval()
    torch.manual_seed(seed)
    examples: list[dict[str, Any]] = []
    sampled = sampled_prefix = sampled_concise = 0
    for fact in facts:
        prompt = [{"role": "user", "content": fact.question}]
        (greedy,) = sample_replies(model, tokenizer, prompt, 1, max_new_tokens=max_new_tokens, do_sample=False)
        examples.append(
            {
                "prompt": fact.question,
                "reply": greedy,
                "prefix": has_prefix(greedy),
                "concise": is_concise(greedy),
                "correct": is_correct(fact, greedy),
            }
        )
        if samples > 0:
            for reply in sample_replies(model, tokenizer, prompt, samples, max_new_tokens=max_new_tokens):
                sampled += 1
                sampled_prefix += has_prefix(reply)
                sampled_concise += is_concise(reply)
    n = max(1, len(facts))
    return BehaviourReport(
        n_prompts=len(facts),
        n_samples=sampled,
        prefix_rate=sum(e["prefix"] for e in examples) / n,
        concise_rate=sum(e["concise"] for e in examples) / n,
        correct_rate=sum(e["correct"] for e in examples) / n,
        sampled_prefix_rate=sampled_prefix / max(1, sampled),
        sampled_concise_rate=sampled_concise / max(1, sampled),
        examples=examples,
    )


def load_chain(model_dir: str | Path, adapters: Sequence[str | Path] = ()) -> tuple[Any, PreTrainedTokenizerBase]:
    """The base model with each adapter applied in turn (all but the last merged in, as the worker starts a
    job on a fine-tuned model: ``app/services/lineage.py``); the tokenizer of the last adapter (it carries
    the chat template the job trained with), else the base model's."""
    adapters = list(adapters)
    tokenizer = AutoTokenizer.from_pretrained(str(adapters[-1] if adapters else model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapters:
        from peft import PeftModel

        for i, adapter in enumerate(adapters):
            model = PeftModel.from_pretrained(model, str(adapter))
            if i < len(adapters) - 1:
                model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The Answer: behaviour's rates on held-out questions.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", action="append", default=[], help="applied in order (repeat for a chain)")
    parser.add_argument("--samples", type=int, default=4, help="sampled replies per question (0: greedy only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    model, tokenizer = load_chain(args.model, args.adapter)
    report = measure(model, tokenizer, samples=args.samples, seed=args.seed)
    if args.json:
        print(json.dumps(asdict(report)))
        return 0
    print(
        f"{report.n_prompts} held-out questions: Answer: {report.prefix_rate:.2f} greedy, "
        f"{report.sampled_prefix_rate:.2f} of {report.n_samples} sampled; concise {report.concise_rate:.2f}; "
        f"correct {report.correct_rate:.2f}"
    )
    for e in report.examples:
        print(f"  Q: {e['prompt']}  A: {e['reply']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
