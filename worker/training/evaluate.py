"""Held-out evaluation of a (base or base+adapter) chat model on preference data.

``python -m worker.training.evaluate --model DIR [--adapter DIR] --data valid.jsonl [--samples N] [--json]``

- preference accuracy: fraction of pairs where the model's mean log-likelihood per token of the chosen
  reply exceeds that of the rejected reply (absolute, not relative to a reference model);
- behaviour rate: fraction of replies *sampled* on the held-out prompts that ``demo_data.judge`` accepts
  (only meaningful on the demo data);
- a few example replies.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from worker.training import demo_data
from worker.training.data import chat_token_ids

Message = dict[str, str]


@dataclass
class EvalResult:
    n_pairs: int
    preference_accuracy: float
    mean_margin_per_token: float
    behaviour_rate: float | None = None
    n_samples: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)


def load_pairs(path: str | Path) -> list[dict[str, list[Message]]]:
    """Rows in the conversational explicit-prompt format (the demo data's format)."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
    return rows


@torch.no_grad()
def mean_completion_logps(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[Message], replies: list[list[Message]]
) -> list[float]:
    """Mean per-token log-likelihood of each reply (messages) after ``prompt``, in one padded batch."""
    prompt_ids = chat_token_ids(tokenizer, prompt, generation_prompt=True)
    seqs = [chat_token_ids(tokenizer, prompt + r, generation_prompt=False) for r in replies]
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    completion = mask[:, 1:].clone()
    completion[:, : len(prompt_ids) - 1] = 0
    return ((logps * completion).sum(1) / completion.sum(1).clamp(min=1)).tolist()


@torch.no_grad()
def sample_replies(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[Message],
    n: int,
    *,
    max_new_tokens: int = 24,
    do_sample: bool = True,
) -> list[str]:
    ids = torch.tensor([chat_token_ids(tokenizer, prompt, generation_prompt=True)])
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=1.0 if do_sample else None,
        top_k=0 if do_sample else None,
        top_p=1.0 if do_sample else None,
        num_return_sequences=n if do_sample else 1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [str(tokenizer.decode(o[ids.shape[1] :], skip_special_tokens=True)).strip() for o in out]


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[dict[str, list[Message]]],
    *,
    samples: int = 4,
    n_examples: int = 3,
    seed: int = 0,
) -> EvalResult:
    """Preference accuracy on all pairs; ``samples`` sampled replies (temperature 1) per distinct prompt."""
    model.eval()
    wins, margins = 0, []
    for pair in pairs:
        chosen, rejected = mean_completion_logps(model, tokenizer, pair["prompt"], [pair["chosen"], pair["rejected"]])
        margins.append(chosen - rejected)
        wins += chosen > rejected
    result = EvalResult(
        n_pairs=len(pairs),
        preference_accuracy=wins / max(1, len(pairs)),
        mean_margin_per_token=sum(margins) / max(1, len(margins)),
    )
    if samples > 0:
        torch.manual_seed(seed)
        prompts = list({json.dumps(p["prompt"]): p["prompt"] for p in pairs}.values())
        good = total = 0
        for prompt in prompts:
            text = prompt[-1]["content"]
            for reply in sample_replies(model, tokenizer, prompt, samples):
                ok = demo_data.judge(text, reply)
                good += ok
                total += 1
                if len(result.examples) < n_examples:
                    result.examples.append({"prompt": text, "reply": reply, "preferred": str(ok).lower()})
        result.behaviour_rate = good / max(1, total)
        result.n_samples = total
    return result


def load_model(model_dir: str | Path, adapter_dir: str | Path | None = None) -> tuple[Any, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir or model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Held-out preference accuracy and sampled behaviour rate.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--data", required=True)
    parser.add_argument("--samples", type=int, default=4, help="sampled replies per held-out prompt (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer = load_model(args.model, args.adapter)
    result = evaluate_model(model, tokenizer, load_pairs(args.data), samples=args.samples, seed=args.seed)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        label = "base+adapter" if args.adapter else "base"
        rate = "n/a" if result.behaviour_rate is None else f"{result.behaviour_rate:.2f}"
        print(
            f"[{label}] preference accuracy {result.preference_accuracy:.2f} on {result.n_pairs} pairs; "
            f"preferred-behaviour rate {rate} on {result.n_samples} sampled replies"
        )
        for ex in result.examples:
            verdict = "preferred" if ex["preferred"] == "true" else "not preferred"
            print(f"  Q: {ex['prompt']}  A: {ex['reply']}  ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
