"""``--shape mistral-7b`` of bench/train_throughput.py (the GPU benchmark; see that module's docstring): the
"long" data, the argument checks, and (a) TRL-docs QLoRA vs (b) the project's trainer on the 7B shape."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench._common import record
from bench.train_runs import FILLER, count_tokens, gib, median, run_interleaved, speed_text

# --shape mistral-7b: the recipe's beta and learning rate (worker/training/recipe.py ZEPHYR_IPO), max_length
# 1024; batch size, grad accumulation and steps come from the flags (defaults below).
HP_7B: dict[str, Any] = {
    "beta": 0.01,
    "learning_rate": 5e-6,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_length": 1024,
}
LONG_ROWS = (300, 1000)  # tokens of prompt + the longer reply, per row of the "long" data


def row_length(tokenizer: Any, row: dict[str, Any]) -> int:
    """Tokens of the prompt + the longer reply, chat template applied (what a pair costs at most)."""
    from worker.training.data import chat_token_ids

    return max(len(chat_token_ids(tokenizer, row["prompt"] + row[reply])) for reply in ("chosen", "rejected"))


def write_long_data(
    out: Path, model: Path, n_rows: int, lengths: tuple[int, int] = LONG_ROWS, seed: int = 0
) -> tuple[Path, list[int]]:
    """The "long" variant of varlen (``--shape mistral-7b``): ``n_rows`` demo pairs (cycled), each prompt
    followed by as many FILLER sentences as bring the row (prompt + the longer reply, in ``model``'s
    tokens) to a length drawn uniformly from ``lengths``. Returns the file and the rows' lengths."""
    import random

    from transformers import AutoTokenizer

    from worker.training.demo_data import write_demo_data

    lo, hi = lengths
    tok = AutoTokenizer.from_pretrained(str(model))
    train, _ = write_demo_data(out / "demo")
    base = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    per_sentence = statistics.mean(len(tok(" " + f, add_special_tokens=False)["input_ids"]) for f in FILLER)
    rng = random.Random(seed)
    rows, row_lengths = [], []
    for i in range(n_rows):
        template = base[i % len(base)]
        target = rng.randint(lo, hi)

        def padded(n: int, i: int = i, template: dict[str, Any] = template) -> dict[str, Any]:
            row = json.loads(json.dumps(template))
            extra = " ".join(FILLER[(i + j) % len(FILLER)] for j in range(n))
            row["prompt"][0]["content"] += (" " + extra) if extra else ""
            return row

        n = max(0, int((target - row_length(tok, template)) / per_sentence))  # a first guess
        while n > 0 and row_length(tok, padded(n)) >= target:
            n -= 1
        while row_length(tok, padded(n)) < target:  # the fewest sentences that reach the target
            n += 1
        if row_length(tok, padded(n)) > hi:
            n -= 1
        row = padded(n)
        rows.append(row)
        row_lengths.append(row_length(tok, row))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, row_lengths


def bench_shape(a: argparse.Namespace, tmp: Path) -> None:
    """``--shape mistral-7b``: (a) TRL-docs QLoRA vs (b) the project's trainer on the 7B shape, long data."""
    from transformers import AutoConfig

    from bench import model_shapes

    hp = {**HP_7B, "batch_size": a.batch_size, "gradient_accumulation_steps": a.grad_accum}
    label = model_shapes.shape_label(a.shape, a.layers, a.hidden_size)
    model = model_shapes.model_dir(Path(a.model_cache), a.layers, a.hidden_size, a.device)
    n_params = model_shapes.param_count(AutoConfig.from_pretrained(model))
    n_examples = a.max_steps * hp["batch_size"] * hp["gradient_accumulation_steps"]  # exactly one epoch
    data, lengths = write_long_data(tmp / "long", model, n_examples)
    tokens, truncated, _ = count_tokens(model, data, n_examples, hp["max_length"])
    on_cuda = a.device == "cuda"
    print(
        f"[{label}] {n_params / 1e9:.3f}B params; {n_examples} pairs, {tokens} tokens (rows {min(lengths)}-"
        f"{max(lengths)} tokens, {truncated} cut at {hp['max_length']})",
        flush=True,
    )
    common = ["--model", str(model), "--data", str(data), "--max-steps", str(a.max_steps), "--device", a.device]
    modes = a.modes.split(",")
    # QLoRA for (a) where it exists (CUDA); plain LoRA on CPU, like (b)
    runs, loads = run_interleaved(label, common, modes, a.repeats, tmp, tmp, hp, qlora=on_cuda)
    if "e2e" in modes:
        print(f"[{label}] e2e (c) skipped: not run for this shape", flush=True)

    def tps(r: dict[str, Any]) -> float:
        return float(r.get("trl_num_tokens") or tokens) / float(r["train_s"])

    def peak(rs: list[dict[str, Any]]) -> float | None:
        values = [float(r["peak_gpu_bytes"]) for r in rs if r.get("peak_gpu_bytes") is not None]
        return median(values) if values else None

    def mfu_text(rs: list[dict[str, Any]]) -> str:
        if not on_cuda:
            return "MFU n/a (CPU)"
        name = rs[0].get("gpu_name")
        value = model_shapes.mfu(n_params, median([tps(r) for r in rs]), name)
        return f"MFU {100 * value:.1f}%" if value is not None else f"MFU n/a ({name}: not in the peak table)"

    def cell(mode: str) -> str:
        rs = runs[mode]
        if not rs:
            return "-"
        text = speed_text(mode, rs, tps)
        memory = f"peak GPU {gib(peak(rs))} allocated" if on_cuda else "peak GPU n/a (CPU)"
        wall = median([r["process_wall_s"] for r in rs])
        return f"{text}, {memory}, {mfu_text(rs)}, wall {wall:.1f}s, {rs[0]['steps']} steps"

    ref, proj = runs["reference"], runs["project"]
    recipe = []
    if ref:
        r0 = ref[0]
        quant = "4-bit NF4 + double quant, bf16 compute (TRL docs QLoRA)" if r0.get("quantization") == "nf4" else "none"
        recipe.append(
            f"(a) quantization {quant}, gradient checkpointing {r0.get('gradient_checkpointing')}, "
            f"optim {r0.get('optim')}, bf16 {r0.get('bf16')}"
        )
    if proj:
        res = proj[0].get("resolved") or {}
        recipe.append(
            f"(b) resolved: quantization {res.get('quantization')}, gradient checkpointing "
            f"{res.get('gradient_checkpointing')}, optim {res.get('optim')}, attn {res.get('attn_implementation')}, "
            f"liger {res.get('use_liger_kernel')}, precomputed reference {res.get('precompute_ref_log_probs')}, "
            f"length-grouped {res.get('group_by_length')}"
        )
        if on_cuda:
            qlora = (
                res.get("quantization") == "nf4"
                and res.get("gradient_checkpointing") is True
                and res.get("optim") == "paged_adamw_8bit"
            )
            recipe.append(
                "(b) is QLoRA + gradient checkpointing + paged 8-bit AdamW: "
                + ("confirmed" if qlora else "NOT what ran (see the resolved values)")
            )
    if not on_cuda:
        recipe.append("no quantization on CPU: (a) and (b) both train plain LoRA in fp32")
    ratio = []
    if ref and proj:
        speedup = median([tps(x) for x in proj]) / median([tps(x) for x in ref])
        pairs = ", ".join(f"{tps(p) / tps(q):.2f}" for p, q in zip(proj, ref, strict=False))
        ratio.append(f"(b)/(a) tok/s = {speedup:.2f}x of medians (per repeat {pairs})")
        pa, pb = peak(ref), peak(proj)
        ratio.append(f"peak GPU memory (b)/(a) = {pb / pa:.2f}x" if pa and pb else "peak GPU memory (b)/(a) n/a (CPU)")
    if runs["warm"] and ref:
        ratio.append(f"warm (b)/(a) = {tps(runs['warm'][0]) / median([tps(x) for x in ref]):.2f}x")
    cells: dict[str, str] = {
        "shape": f"{label} ({n_params / 1e9:.3f}B params; {a.repeats} repeats, load during runs "
        f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f})",
        "data": f"long: {n_examples} pairs (one epoch), {tokens} tok, rows {min(lengths)}-{max(lengths)} tok; "
        f"max_length {hp['max_length']}, batch {hp['batch_size']} x grad accum {hp['gradient_accumulation_steps']}, "
        f"{a.max_steps} steps",
        "recipe": "; ".join(recipe) or "-",
        "(a) reference": cell("reference"),
        "(b) project": cell("project"),
        "(b) warm cache": cell("warm"),
        "ratio": "; ".join(ratio) or "-",
        "notes": "MFU = 6 x N_params x tok/s / peak dense bf16 FLOP/s (conventional; see bench/model_shapes.py); "
        "(c) e2e and the full-data loss not run for this shape (random weights)",
    }
    print(json.dumps(runs, indent=1))
    key = f"train {label} {a.max_steps} {hp['batch_size']}x{hp['gradient_accumulation_steps']} {a.device} {a.modes}"
    if a.no_record:
        row = "; ".join(f"{k}: {v}" for k, v in cells.items())
        print(f"\n[train_throughput_mistral7b] not recorded (--no-record): {row}")
    else:
        record("train_throughput_mistral7b", key, cells)


def check_shape_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse what cannot be a mistral-7b benchmark (7B on CPU), fill the shape's defaults."""
    from bench import model_shapes

    try:
        shrunk = model_shapes.is_shrunk(a.layers, a.hidden_size)
    except ValueError as exc:
        p.error(str(exc))
    if a.device == "cpu" and not shrunk:
        p.error(
            "--shape mistral-7b on --device cpu: a 7B model on CPU is not a benchmark (about 29 GB in fp32, "
            "minutes per step). Run it on a GPU with --device cuda, or shrink it to smoke-test the code path: "
            "--layers 1 --hidden-size 256"
        )
    if a.device == "cuda":
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device")
        if importlib.util.find_spec("bitsandbytes") is None:
            p.error("--device cuda --shape mistral-7b trains QLoRA: install bitsandbytes (pip install -e '.[gpu]')")
    a.batch_size = a.batch_size or HP_7B["batch_size"]
    if a.batch_size < 1 or a.grad_accum < 1 or a.max_steps < 1:
        p.error("--batch-size, --grad-accum and --max-steps must be >= 1")
    a.model_cache = a.model_cache or str(model_shapes.default_cache())
