"""Samples during training: what the policy and the reference reply to a fixed set of prompts.

At each evaluation step (every ``eval_every`` optimiser steps; the same cadence without a validation file)
and once at the end, ``SamplesCallback`` takes the model (a PEFT model) out of train mode and, for up to
``n_prompts`` prompts of the validation file (else of the training file, which the policy trains on):

- generates the policy's reply and the reference's (the same model under ``disable_adapter()``), greedy
  and sampled (``temperature``, seeded with the job's seed, under ``torch.random.fork_rng`` so the
  training's random stream is the same with or without samples). The reference does not change during
  a run, so its replies and log-probabilities are computed once (at the first round) and reused;
- computes the summed log-probability (nats) of the pair's chosen and rejected reply under both, so a
  falling chosen log-probability (likelihood displacement) shows while the margin still grows;
- scores the greedy replies with the configured graders (``worker/training/graders.py``: scores may be
  null, with a reason in the row; an unavailable ``score_model`` endpoint is a warning event, never a
  failure). The reference's scores are computed once, like its replies.

It reports a compact ``samples`` event (type ``message``, ``data.samples``: texts cut to
``EVENT_TEXT_CHARS``), a ``metrics`` report with the means (``samples/...`` keys), and appends the full
rows to ``samples.jsonl`` (reported as the ``samples`` artifact at the end, a result file of the job).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from contracts.data_formats import PreferenceExample, parse_preference_file
from contracts.method import Samples
from contracts.pair_tokens import split_pair
from worker.training.data import chat_token_ids, tokenizer_special_tokens
from worker.training.graders import Graders
from worker.training.reporter import Reporter

log = logging.getLogger(__name__)

EVENT_TEXT_CHARS = 300
"""Each text in a ``samples`` event is cut to this many characters (the result file keeps them whole)."""
LOGP_KEYS = ("policy_logp_chosen", "policy_logp_rejected", "reference_logp_chosen", "reference_logp_rejected")


@dataclass(frozen=True)
class SamplePrompt:
    """One pair whose prompt is sampled: the prompt's token ids (as the policy sees it before replying) and
    the token ids of prompt + chosen / prompt + rejected (cut to ``max_length``, as in training), whose
    first ``n_prompt`` tokens are the prompt (``contracts.pair_tokens.split_pair``)."""

    example: PreferenceExample
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    n_prompt: int

    @property
    def texts(self) -> tuple[str, str, str]:
        """(the prompt's last message, or a text row's prompt; chosen; rejected) for display."""
        ex = self.example
        if ex.verbatim and ex.text is not None:
            return ex.text
        return reply_text(ex.prompt[-1:]), reply_text(ex.chosen), reply_text(ex.rejected)


def reply_text(messages: Sequence[dict[str, str]]) -> str:
    """The text of a reply given as messages (usually one assistant message)."""
    return "\n".join(str(m.get("content", "")) for m in messages)


def _pair_ids(tokenizer: PreTrainedTokenizerBase, ex: PreferenceExample) -> tuple[list[int], list[int], list[int]]:
    """Token ids of prompt, prompt + chosen, prompt + rejected, as ``worker.training.data.pair_tokens``
    builds them (chat template, or a text row as written with EOS after the reply)."""
    if ex.verbatim and ex.text is not None:
        prompt, chosen, rejected = ex.text
        eos = tokenizer.eos_token or ""
        texts = (prompt, prompt + chosen.removesuffix(eos) + eos, prompt + rejected.removesuffix(eos) + eos)
        ids = [[int(i) for i in tokenizer(text=t)["input_ids"]] for t in texts]
        return ids[0], ids[1], ids[2]
    return (
        chat_token_ids(tokenizer, ex.prompt, generation_prompt=True),
        chat_token_ids(tokenizer, ex.prompt + ex.chosen),
        chat_token_ids(tokenizer, ex.prompt + ex.rejected),
    )


def choose_prompts(
    tokenizer: PreTrainedTokenizerBase,
    *,
    validation_file: str | None,
    train_file: str,
    n_prompts: int,
    max_length: int,
    held_out_file: str | None = None,
    held_out_lines: Sequence[int] = (),
) -> tuple[list[SamplePrompt], str]:
    """The first ``n_prompts`` pairs with distinct prompts of the validation file, else of the prompts held out
    of the training file (``worker/training/holdout.py``), else of the training file, leaving out prompts
    that fill ``max_length`` tokens; and where they came from (``"validation file"``, ``"held-out training
    prompts"`` or ``"training file"``). The files were validated before (``run._resolve``). Line ``k`` of
    ``held_out_file`` is line ``held_out_lines[k - 1]`` of the training file: rows name that one."""
    path, source = (
        (validation_file, "validation file")
        if validation_file
        else (held_out_file, "held-out training prompts")
        if held_out_file
        else (train_file, "training file")
    )
    examples, _ = parse_preference_file(path, special_tokens=tokenizer_special_tokens(tokenizer))
    if path == held_out_file and held_out_lines:
        examples = [ex.model_copy(update={"line": held_out_lines[ex.line - 1]}) for ex in examples]
    chosen: list[SamplePrompt] = []
    seen: set[str] = set()
    for ex in examples:
        if len(chosen) >= n_prompts:
            break
        key = json.dumps([ex.prompt, ex.text and ex.text[0]], sort_keys=True)
        if key in seen:
            continue
        prompt_ids, chosen_ids, rejected_ids = _pair_ids(tokenizer, ex)
        n_prompt = split_pair(prompt_ids, chosen_ids, rejected_ids).prompt
        if len(prompt_ids) >= max_length or n_prompt >= max_length:
            continue
        seen.add(key)
        chosen.append(SamplePrompt(ex, prompt_ids, chosen_ids[:max_length], rejected_ids[:max_length], n_prompt))
    return chosen, source


class SamplesCallback(TrainerCallback):
    """Samples every ``every`` optimiser steps (``on_step_end``) and at the end (``final``, called by
    ``run.py``); ``seconds`` is the wall time spent sampling in this process (for the cost figure)."""

    def __init__(
        self,
        reporter: Reporter,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[SamplePrompt],
        *,
        source: str,
        config: Samples,
        every: int,
        seed: int,
        out_path: Path,
        total_steps: int,
        metrics_rows: list[dict[str, Any]] | None = None,
        graders: Graders | None = None,
    ) -> None:
        self.reporter = reporter
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.source = source
        self.config = config
        self.every = max(1, every)
        self.seed = seed
        self.out_path = out_path
        self.total_steps = total_steps
        self.metrics_rows = metrics_rows
        self.sampled_steps: list[int] = []
        self.seconds = 0.0
        self.disabled = False
        self._reference: tuple[list[str], list[str], list[tuple[float, float]]] | None = None
        self.graders = graders if graders is not None else Graders(config.graders, None)
        self._reference_scores: tuple[list[dict[str, float | None]], list[dict[str, str]]] | None = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        # After NonFiniteGuard and StopCallback: no samples from NaN weights, none delaying a pause or cancel.
        if control.should_training_stop or kw.get("model") is None:
            return
        if state.global_step % self.every == 0:
            self.sample(kw["model"], state.global_step)

    def final(self, model: Any, step: int) -> None:
        """The end-of-training samples (skipped when this step was just sampled)."""
        if step not in self.sampled_steps:
            self.sample(model, step)
        if self.sampled_steps:
            self.reporter.artifact("samples", str(self.out_path))

    def sample(self, model: Any, step: int) -> None:
        """One round: replies, log-probs and grades for every prompt, reported and appended to the file."""
        if not self.prompts or self.disabled:
            return
        started = time.monotonic()
        was_training = model.training
        model.eval()
        try:
            rows = self._rows(model, step)
        except RuntimeError as e:  # e.g. a sampling distribution with inf/nan: training goes on, samples stop
            log.exception("sampling failed at step %d", step)
            self.disabled = True
            self.reporter.event(f"Samples stopped at step {step}: {type(e).__name__}: {e}"[:4000], level="warn")
            return
        finally:
            if was_training:
                model.train()
        self.seconds += time.monotonic() - started
        self.sampled_steps.append(step)
        with self.out_path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._report(rows, step, time.monotonic() - started)

    @torch.no_grad()
    def _rows(self, model: Any, step: int) -> list[dict[str, Any]]:
        prompts = [p.prompt_ids for p in self.prompts]
        policy_greedy = self._generate(model, prompts, sample=False)
        policy_sampled = self._generate(model, prompts, sample=True)
        policy_logps = self._logps(model)
        if self._reference is None:  # the adapter disabled, the reference never changes: computed once
            with model.disable_adapter():
                self._reference = (
                    self._generate(model, prompts, sample=False),
                    self._generate(model, prompts, sample=True),
                    self._logps(model),
                )
        reference_greedy, reference_sampled, reference_logps = self._reference
        items = [dict(zip(("prompt", "chosen", "rejected"), p.texts, strict=True)) for p in self.prompts]
        scores: list[dict[str, float | None]] = [{} for _ in self.prompts]
        reasons: list[dict[str, str]] = [{} for _ in self.prompts]
        if self.config.graders:
            scores, reasons, warnings = self.graders.score(policy_greedy, items)
            if self._reference_scores is not None:
                reference_scores, reference_reasons = self._reference_scores
            else:  # kept once complete (an endpoint that was down is asked again next round)
                reference_scores, reference_reasons, more = self.graders.score(reference_greedy, items)
                if not more:
                    self._reference_scores = (reference_scores, reference_reasons)
                warnings += more
            for warning in warnings:
                self.reporter.event(f"Samples at step {step}: {warning}"[:4000], level="warn")
            for i in range(len(self.prompts)):
                scores[i].update({f"{k}_reference": v for k, v in reference_scores[i].items()})
                reasons[i].update({f"{k}_reference": v for k, v in reference_reasons[i].items()})
        rows = []
        for i, p in enumerate(self.prompts):
            prompt, chosen, rejected = p.texts
            row: dict[str, Any] = {
                "step": step,
                "line": p.example.line,
                "prompt": p.example.prompt,
                "prompt_text": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "reference_reply": reference_greedy[i],
                "policy_reply": policy_greedy[i],
                "reference_sampled_reply": reference_sampled[i],
                "policy_sampled_reply": policy_sampled[i],
                "policy_logp_chosen": policy_logps[i][0],
                "policy_logp_rejected": policy_logps[i][1],
                "reference_logp_chosen": reference_logps[i][0],
                "reference_logp_rejected": reference_logps[i][1],
            }
            if self.config.graders:
                row["scores"] = scores[i]
                if reasons[i]:
                    row["score_reasons"] = reasons[i]
            rows.append(row)
        return rows

    def _generate(self, model: Any, prompts: list[list[int]], *, sample: bool) -> list[str]:
        """Replies to ``prompts`` in one left-padded batch (``max_new_tokens``), decoded without specials;
        sampled ones with the job's seed (the same for policy and reference, at every step)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), int(pad or 0), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        device = next(model.parameters()).device
        options: dict[str, Any] = (
            {"do_sample": True, "temperature": self.config.temperature, "top_k": 0, "top_p": 1.0}
            if sample
            else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        )
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=self.config.max_new_tokens,
                pad_token_id=pad,
                eos_token_id=self.tokenizer.eos_token_id,
                use_cache=True,
                **options,
            )
        return [str(self.tokenizer.decode(o[width:], skip_special_tokens=True)).strip() for o in out]

    def _logps(self, model: Any, batch_rows: int = 16) -> list[tuple[float, float]]:
        """Summed log-probability (nats) of each pair's chosen and rejected reply tokens after its prompt,
        ``batch_rows`` right-padded sequences per forward pass."""
        seqs = [(s, p.n_prompt) for p in self.prompts for s in (p.chosen_ids, p.rejected_ids)]
        device = next(model.parameters()).device
        sums: list[float] = []
        for start in range(0, len(seqs), batch_rows):
            chunk = seqs[start : start + batch_rows]
            width = max(len(s) for s, _ in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            completion = torch.zeros_like(ids)
            for i, (s, n_prompt) in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
                completion[i, n_prompt : len(s)] = 1
            ids, mask, completion = ids.to(device), mask.to(device), completion.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            sums += (logps * completion[:, 1:]).sum(1).tolist()
        return [(round(float(sums[2 * i]), 4), round(float(sums[2 * i + 1]), 4)) for i in range(len(self.prompts))]

    def _report(self, rows: list[dict[str, Any]], step: int, seconds: float) -> None:
        def cut(text: str) -> str:
            return text if len(text) <= EVENT_TEXT_CHARS else text[: EVENT_TEXT_CHARS - 1] + "…"

        compact = [
            {
                "prompt": cut(row["prompt_text"]),
                "chosen": cut(row["chosen"]),
                "rejected": cut(row["rejected"]),
                "reference_reply": cut(row["reference_reply"]),
                "policy_reply": cut(row["policy_reply"]),
                **{k: row[k] for k in LOGP_KEYS},
                **({"scores": row["scores"]} if "scores" in row else {}),
                **(
                    {"score_reasons": {k: cut(v) for k, v in row["score_reasons"].items()}}
                    if "score_reasons" in row
                    else {}
                ),
            }
            for row in rows
        ]
        changed = sum(row["policy_reply"] != row["reference_reply"] for row in rows)
        self.reporter.event(
            f"Samples at step {step}: {len(rows)} prompts from the {self.source}, "
            f"{changed} greedy replies differ from the reference",
            data={"step": step, "source": self.source, "samples": compact},
        )
        n = len(rows)
        metrics: dict[str, Any] = {
            "step": step,
            "total_steps": self.total_steps,
            **{f"samples/{k}": round(sum(row[k] for row in rows) / n, 4) for k in LOGP_KEYS},
            "samples/changed_fraction": round(changed / n, 4),
            "samples/seconds": round(seconds, 3),
        }
        for key in rows[0].get("scores", {}):  # the mean of the replies that got a score; null when none did
            values = [row["scores"][key] for row in rows if row["scores"][key] is not None]
            metrics[f"samples/{key}"] = round(sum(values) / len(values), 4) if values else None
        if self.metrics_rows is not None:
            self.metrics_rows.append({"split": "samples", **metrics})
        self.reporter.metrics(metrics)
