"""Training throughput: a docs-style TRL script vs this project's trainer vs a full job through the stack.

    python -m bench.train_throughput [--variant demo|varlen|both] [--max-steps 40] [--device cpu|cuda]
                                     [--modes reference,project,warm,e2e] [--repeats 3]

    # a real model on CPU: SmolLM2-135M-Instruct, plain TRL vs the project and each speed-up switched off
    python -m bench.train_throughput --shape smollm2 [--max-steps 6] [--repeats 2] [--batch-size 2] [--model DIR]
                                     [--modes reference,project,noprecompute,checkpointing,nogroup,warm,...]
    # (bench/train_smollm2.py; where one of its steps spends its time: python -m bench.train_profile)

    # GPU: a Mistral-7B-shaped model (random weights, built locally), QLoRA IPO at max_length 1024
    python -m bench.train_throughput --device cuda --shape mistral-7b [--max-steps 20] [--batch-size 4]
                                     [--grad-accum 1] [--repeats 1] [--model-cache DIR]
    # its CPU smoke test (the same code path on a shrunk model, plain LoRA; not a benchmark)
    python -m bench.train_throughput --device cpu --shape mistral-7b --layers 1 --hidden-size 256 \\
                                     --max-steps 2 --repeats 1 --modes reference,project --no-record

Same tiny model (``--shape tiny``, the default), same data, same hyperparameters for every mode:

(a) ``reference``: bench/reference_trl.py (DPOConfig/DPOTrainer as the TRL docs write them), a child process;
(b) ``project``:   ``worker.training.run.train(TrainRequest(...), ListReporter())`` in a child process, with
                   an empty prepared-data cache (a first job on this file: reference log-probs computed);
    ``warm``:      (b) again on the cache the first (b) run filled (a retry, a resume or a repeated job);
(c) ``e2e``:       ``ipo serve`` + ``ipo worker``; upload -> create -> poll until ``succeeded``.

(a) and (b) run ``--repeats`` times, interleaved (a b, b a, a b, ...: drift in the machine's load hits
both alike), repeat i with seed 42+i for both; the row gives medians. Throughput = non-pad
prompt+completion tokens the run trained on (TRL's ``num_tokens``: the attention-mask sum of every
batch, prompt+chosen and prompt+rejected rows; cross-checked against our own count with the chat
template, which is exact when the steps cover whole epochs, as 40 x 8 = 320 does) divided by the
training time: ``trainer.train()`` for (a); for (b), from the trainer's "training ..." event to its
last step's metrics report, plus the seconds it spent computing reference log-probs before training
(the work it moved out of the loop). (c) is reported as end-to-end wall time against (a)'s whole process
wall time (interpreter start to adapter saved). ``varlen`` pads half of the prompts with 1-6 extra
sentences, so batches mix short and long rows (what length-grouped batching helps).

What is learned: "loss" is TRL's logged train loss of the last logging window (which pairs fall in it
depends on the batching, so it is not comparable across batchings); "full-data loss" is the IPO loss of
the trained adapter over every training pair (TRL ``DPOTrainer.evaluate``, same code for every mode,
untimed). The noise scale is its spread over the seeds of (a).
Targets: (b) >= 1.3x (a) tokens/s with full-data losses within that noise; (c) - (a) wall < 5 s + 3% of (a).

``--shape smollm2``: see bench/train_smollm2.py (rows in the ``train_throughput_smollm2`` table).
The code is split: bench/train_runs.py (children, command lines, interleaving, full-data loss),
bench/train_smollm2.py and bench/train_mistral7b.py (those shapes); this module keeps the tiny shape and the CLI.

``--shape mistral-7b`` (the GPU benchmark; default ``tiny`` is all of the above): the model is
bench/model_shapes.py's Mistral-7B-v0.1-shaped ``MistralConfig`` with random bf16 weights, built once into
``--model-cache`` (default ``$TMPDIR/ipo-bench-models``, about 15 GB) with the tiny model's tokenizer. Data:
the "long" variant, demo pairs whose prompts carry many FILLER sentences so every row (prompt + the longer
reply) is 300-1000 tokens, exactly one epoch of ``max_steps x batch_size x grad_accum`` pairs; max_length
1024, batch 4 pairs, grad accum 1, 20 steps by default (QLoRA 7B on one 80 GB GPU, a few minutes a run),
beta 0.01 and learning rate 5e-6 (the recipe's, ZEPHYR_IPO). (a) is the TRL docs' QLoRA (``--qlora``:
4-bit NF4, double quantisation, bf16 compute, LoRA r 16 / alpha 64 / dropout 0.1 on q,k,v,o like the
recipe, DPOConfig defaults otherwise); (b) is the project's trainer, which resolves ``auto`` to QLoRA +
gradient checkpointing + paged 8-bit AdamW on CUDA (checked against the resolved config it reports; the
row says what ran). Figures: tokens/s as above, peak GPU memory (``torch.cuda.max_memory_allocated()``
in each child, GiB), MFU = 6 x N_params x tokens/s / the GPU's peak dense bf16 FLOP/s (N_params of the
base model; a conventional figure: a frozen-base LoRA step does less than 6N per token, checkpointing
and the reference pass more; see model_shapes.py), and the (b)/(a) ratios of tokens/s and peak memory.
The full-data loss is not computed (random weights learn nothing worth comparing; a 7B fp32 evaluation
on CPU is not feasible) and (c) e2e is skipped for this shape. On CPU the shape is refused unless
``--layers``/``--hidden-size`` shrink it (a smoke test of the code path: both (a) and (b) then train
plain LoRA in fp32, no quantization on CPU, and the row says so). Rows go to the
``train_throughput_mistral7b`` table (``--no-record``: print the row only).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import record, stack, tiny_model_dir, wait_for_quiet
from bench.train_mistral7b import HP_7B, LONG_ROWS, bench_shape, check_shape_args, row_length, write_long_data
from bench.train_runs import (
    FILLER,
    HP,
    count_tokens,
    full_data_loss,
    median,
    method_block,
    project_child,
    run_interleaved,
    speed_text,
)
from bench.train_smollm2 import DEFAULT_MODES, bench_smollm2

__all__ = ["HP", "HP_7B", "LONG_ROWS", "check_shape_args", "count_tokens", "main", "row_length", "write_long_data"]

SHAPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"max_steps": 40, "repeats": 3, "modes": "reference,project,warm,e2e"},
    "smollm2": {"max_steps": 6, "repeats": 2, "modes": DEFAULT_MODES},
    "mistral-7b": {"max_steps": 20, "repeats": 1, "modes": "reference,project"},
}


def write_data(out: Path, variant: str) -> Path:
    from worker.training.demo_data import write_demo_data

    train, _ = write_demo_data(out / "demo")
    if variant == "demo":
        return train
    rows = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if i % 2 == 0:
            extra = " ".join(FILLER[(i + j) % len(FILLER)] for j in range((i * 7) % 6 + 1))
            row["prompt"][0]["content"] += " " + extra
    path = out / "varlen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_e2e(model: Path, data: Path, max_steps: int, device: str) -> dict[str, Any]:
    """One job through ``ipo serve`` + ``ipo worker`` (the worker's own, empty, prepared-data cache)."""
    import httpx

    with stack("train-e2e", worker=True, model=model, worker_env={"IPO_DEVICE": device}) as st:
        time.sleep(1.0)  # let the worker settle into its idle poll
        with httpx.Client(base_url=st.url, headers=st.headers, timeout=60) as c:
            t0 = time.monotonic()
            f = c.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", data.read_bytes())})
            f.raise_for_status()
            job = c.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": "tiny-mistral",
                    "training_file": f.json()["id"],
                    "seed": HP["seed"],
                    "method": method_block(max_steps),
                },
            )
            job.raise_for_status()
            job_id = job.json()["id"]
            while True:
                j = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
                if j["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.1)
            wall = time.monotonic() - t0
            if j["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} ended {j['status']}: {j.get('error')}")
            events = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    metrics = [e["data"] for e in events if e.get("type") == "metrics" and e.get("data") and "train_loss" in e["data"]]
    metrics.sort(key=lambda d: d["step"])
    tps = [m["tokens_per_second"] for m in metrics if m.get("tokens_per_second")]
    return {
        "wall_s": wall,
        "final_loss": metrics[-1]["train_loss"] if metrics else None,
        "trl_num_tokens": j.get("trained_tokens"),
        "trainer_reported_tps": sum(tps) / len(tps) if tps else None,
        "steps": metrics[-1]["step"] if metrics else None,
    }


def bench_variant(variant: str, a: argparse.Namespace, model: Path, tmp: Path) -> None:
    data = write_data(tmp / variant, variant)
    n_examples = a.max_steps * HP["batch_size"]
    tokens, truncated, longest = count_tokens(model, data, n_examples)
    print(
        f"[{variant}] {n_examples} examples, {tokens} tokens (longest row {longest}, {truncated} rows cut at "
        f"{HP['max_length']})",
        flush=True,
    )
    common = ["--model", str(model), "--data", str(data), "--max-steps", str(a.max_steps), "--device", a.device]
    modes = a.modes.split(",")
    runs, loads = run_interleaved(variant, common, modes, a.repeats, tmp / variant, tmp)
    for r, mode in ((r, m) for m in ("reference", "project") for r in runs[m]):
        r["adapter"] = r.get("adapter") or str(tmp / variant / f"{mode}-{r['repeat']}")
    for mode in ("reference", "project", "warm"):
        for r in runs[mode]:
            r["full_data_loss"] = full_data_loss(model, data, Path(r["adapter"]))
        if runs[mode]:
            print(f"[{variant}] {mode} full-data losses: {[round(r['full_data_loss'], 4) for r in runs[mode]]}")
    e2e = run_e2e(model, data, a.max_steps, a.device) if "e2e" in modes else None
    if e2e:
        print(f"[{variant}] e2e: {e2e}", flush=True)

    def tps(r: dict[str, Any]) -> float:
        # TRL's own count (attention-mask sum of the batches it trained on: non-pad prompt+completion
        # tokens); every repeat trains on the same pairs (one epoch). Our count is the cross-check.
        return float(r.get("trl_num_tokens") or tokens) / float(r["train_s"])

    def cell(mode: str) -> str:
        rs = runs[mode]
        if not rs:
            return "-"
        text = speed_text(mode, rs, tps)
        losses = ", ".join(f"{r['final_loss']:.4f}" for r in rs)
        full = ", ".join(f"{r['full_data_loss']:.4f}" for r in rs)
        wall = median([r["process_wall_s"] for r in rs])
        return f"{text}, wall {wall:.1f}s, loss {losses}; full-data loss {full}"

    cells: dict[str, str] = {
        "variant": f"{variant} ({tokens} tok, longest {longest}; {a.repeats} repeats, load during runs "
        f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f})",
        "(a) reference": cell("reference"),
        "(b) project": cell("project"),
        "(b) warm cache": cell("warm"),
        "(c) e2e": (
            f"wall {e2e['wall_s']:.1f}s, loss {e2e['final_loss']:.4f}, "
            f"trainer-reported {e2e['trainer_reported_tps'] or 0:.0f} tok/s"
            if e2e
            else "-"
        ),
    }
    ref, proj = runs["reference"], runs["project"]
    ratio = []
    if ref and proj:
        speedup = median([tps(x) for x in proj]) / median([tps(x) for x in ref])
        pairs = ", ".join(f"{tps(p) / tps(q):.2f}" for p, q in zip(proj, ref, strict=False))
        ref_losses = [x["full_data_loss"] for x in ref]
        gap = abs(median([x["full_data_loss"] for x in proj]) - median(ref_losses))
        noise = max(ref_losses) - min(ref_losses)
        ratio.append(
            f"(b)/(a) tok/s = {speedup:.2f}x of medians (per repeat {pairs}; target >= 1.30x: "
            f"{'met' if speedup >= 1.3 else 'missed'}); full-data loss (b)-(a) medians {gap:.4f} vs (a)'s spread "
            f"over seeds {noise:.4f}: {'within noise' if gap <= noise else 'outside noise'}"
        )
    if runs["warm"] and ref:
        ratio.append(f"warm (b)/(a) = {tps(runs['warm'][0]) / median([tps(x) for x in ref]):.2f}x")
    if ref and e2e:
        ref_wall = median([x["process_wall_s"] for x in ref])
        overhead = e2e["wall_s"] - ref_wall
        budget = 5 + 0.03 * ref_wall
        ratio.append(
            f"(c)-(a) wall = {overhead:+.1f}s, (c)/(a) = {e2e['wall_s'] / ref_wall:.2f}x "
            f"(target < {budget:.1f}s: {'met' if overhead < budget else 'missed'})"
        )
    cells["ratio"] = "; ".join(ratio) or "-"
    print(json.dumps(runs, indent=1))
    record("train_throughput", f"train {variant} {a.max_steps} {a.device} {a.modes}", cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "smollm2", "mistral-7b"], default="tiny")
    p.add_argument("--variant", choices=["demo", "varlen", "both"], default="both", help="(--shape tiny)")
    p.add_argument("--max-steps", type=int, default=None, help="default 40 (tiny), 6 (smollm2), 20 (mistral-7b)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--modes",
        default=None,
        help=f"default reference,project,warm,e2e (tiny), {DEFAULT_MODES} (smollm2), reference,project (7b)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of each mode, interleaved; the row gives medians. Default 3 (tiny), 2 (smollm2), 1 (7b)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="pairs per micro-batch (smollm2: 2, 7b: 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (--shape mistral-7b)")
    p.add_argument("--layers", type=int, default=None, help="shrink mistral-7b to N layers (CPU smoke tests)")
    p.add_argument("--hidden-size", type=int, default=None, help="shrink mistral-7b's hidden size (multiple of 128)")
    p.add_argument("--model-cache", default=None, help="where the mistral-7b model directory is built once")
    p.add_argument("--no-record", action="store_true", help="print the mistral-7b row, leave RESULTS.md alone")
    p.add_argument("--child-project", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help="(--shape smollm2) a local model directory instead of the cached SmolLM2")
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=HP["seed"], help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--without", default=None, help=argparse.SUPPRESS)  # (b) child: speed-ups switched off
    p.add_argument("--samples", type=int, default=None, help=argparse.SUPPRESS)  # (b) child: samples.n_prompts
    p.add_argument("--beta", type=float, default=HP["beta"], help=argparse.SUPPRESS)
    p.add_argument("--learning-rate", type=float, default=HP["learning_rate"], help=argparse.SUPPRESS)
    p.add_argument("--max-length", type=int, default=HP["max_length"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_project:
        project_child(a)
        return
    for name, value in SHAPE_DEFAULTS[a.shape].items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    if a.shape == "tiny":
        if a.layers is not None or a.hidden_size is not None or a.batch_size is not None or a.grad_accum != 1:
            p.error("--layers, --hidden-size, --batch-size and --grad-accum go with --shape mistral-7b")
        if a.model is not None:
            p.error("--model goes with --shape smollm2")
    elif a.shape == "smollm2":
        if a.layers is not None or a.hidden_size is not None or a.grad_accum != 1:
            p.error("--layers, --hidden-size and --grad-accum go with --shape mistral-7b")
        if a.model is not None and not (Path(a.model) / "config.json").is_file():
            p.error(f"--model {a.model}: no config.json there (a local model directory is needed)")
    else:
        check_shape_args(p, a)
    wait_for_quiet()
    if a.shape == "smollm2":
        with tempfile.TemporaryDirectory(prefix="ipo-bench-train-") as tmp:
            bench_smollm2(a, Path(tmp))
        return
    if a.shape == "mistral-7b":
        with tempfile.TemporaryDirectory(prefix="ipo-bench-train-") as tmp:
            bench_shape(a, Path(tmp))
        return
    model = tiny_model_dir()
    with tempfile.TemporaryDirectory(prefix="ipo-bench-train-") as tmp:
        for variant in ["demo", "varlen"] if a.variant == "both" else [a.variant]:
            bench_variant(variant, a, model, Path(tmp))


if __name__ == "__main__":
    main()
