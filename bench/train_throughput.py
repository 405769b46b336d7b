"""Training throughput: a docs-style TRL script vs this project's trainer vs a full job through the stack.

    python -m bench.train_throughput [--variant demo|varlen|both] [--max-steps 40] [--device cpu|cuda]
                                     [--modes reference,project,warm,e2e] [--repeats 3]

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
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import ROOT, record, stack, tiny_model_dir, wait_for_quiet

HP: dict[str, Any] = {"beta": 0.5, "learning_rate": 1e-3, "batch_size": 8, "max_length": 256, "seed": 42}
# --shape mistral-7b: the recipe's beta and learning rate (worker/training/recipe.py ZEPHYR_IPO), max_length
# 1024; batch size, grad accumulation and steps come from the flags (defaults below).
HP_7B: dict[str, Any] = {
    "beta": 0.01,
    "learning_rate": 5e-6,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_length": 1024,
}
SHAPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"max_steps": 40, "repeats": 3, "modes": "reference,project,warm,e2e"},
    "mistral-7b": {"max_steps": 20, "repeats": 1, "modes": "reference,project"},
}
LONG_ROWS = (300, 1000)  # tokens of prompt + the longer reply, per row of the "long" data
FILLER = (
    "Please think about the numbers before you answer.",
    "The answer should be one short sentence.",
    "Do not give the product when the sum is asked.",
    "Small numbers are easy to add.",
    "Tell me the result and nothing else.",
)


def method_block(max_steps: int, hp: dict[str, Any] = HP) -> dict[str, Any]:
    return {
        "type": "ipo",
        "ipo": {
            "hyperparameters": {
                "beta": hp["beta"],
                "learning_rate": hp["learning_rate"],
                "batch_size": hp["batch_size"],
                "gradient_accumulation_steps": hp.get("gradient_accumulation_steps", 1),
                "max_length": hp["max_length"],
                "n_epochs": 1,
                "max_steps": max_steps,
                "warmup_ratio": 0.0,  # TRL's default: no warmup
                "lr_scheduler": "linear",  # TRL's default
                "sft_weight": 0.0,  # pure IPO, like the reference
            },
            "lora": {"r": 16, "alpha": 64, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        },
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


def count_tokens(model: Path, data: Path, n_examples: int, max_length: int = HP["max_length"]) -> tuple[int, int, int]:
    """(tokens trained on, truncated examples, longest row) for the first pass over ``n_examples`` examples
    (the whole file when n_examples >= its size; every 40-step run here is exactly one epoch of 320)."""
    from transformers import AutoTokenizer

    from worker.training.data import chat_token_ids

    tok = AutoTokenizer.from_pretrained(str(model))
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    total = truncated = longest = 0
    for i in range(n_examples):
        row = rows[i % len(rows)]
        for reply in (row["chosen"], row["rejected"]):
            n = len(chat_token_ids(tok, row["prompt"] + reply))
            longest = max(longest, n)
            truncated += n > max_length
            total += min(n, max_length)
    return total, truncated, longest


# ---------------------------------------------------------------------------------------------- (b) child


def project_child(a: argparse.Namespace) -> None:
    t_start = time.monotonic()
    from contracts.method import Method
    from worker.training.reporter import ListReporter
    from worker.training.request import TrainRequest
    from worker.training.run import train

    reporter = ListReporter()
    request = TrainRequest(
        job_id="ftjob-bench",
        attempt=1,
        model_path=a.model,
        train_file=a.data,
        output_dir=a.out,
        seed=a.seed,
        method=Method.model_validate(method_block(a.max_steps, child_hp(a))),
        device=a.device,
        cache_dir=a.cache_dir,
    )
    code = train(request, reporter)
    if code != 0:
        raise SystemExit(f"train() returned {code}: {[r.message for r in reporter.of_kind('error')]}")
    events = reporter.of_kind("event")
    started = next(r.time for r in events if (r.message or "").startswith("training "))
    ref_logps_s = sum(float((r.data or {}).get("ref_logps_seconds", 0.0)) for r in events)
    train_metrics = [r for r in reporter.of_kind("metrics") if r.data and "train_loss" in r.data]
    last = train_metrics[-1]
    assert started is not None and last.time is not None, "trainer reports carry their time"
    done = reporter.of_kind("done")[-1]
    resolved = reporter.of_kind("resolved")[-1].data or {}
    import torch

    on_cuda = a.device == "cuda" and torch.cuda.is_available()
    summary = {
        "wall_s": time.monotonic() - t_start,
        "train_s": last.time - started + ref_logps_s,
        "loop_s": last.time - started,
        "ref_logps_s": ref_logps_s,
        "cache_hit": any("loaded from the cache" in (r.message or "") for r in events),
        "final_loss": last.data["train_loss"],  # type: ignore[index]
        "trl_num_tokens": (done.data or {}).get("trained_tokens"),
        "steps": last.data["step"],  # type: ignore[index]
        "adapter": str(Path(a.out) / "adapter"),
        "resolved": {k: resolved.get(k) for k in RESOLVED_KEYS},
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if on_cuda else None,
        "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved() if on_cuda else None,
        "gpu_name": torch.cuda.get_device_name(0) if on_cuda else None,
    }
    Path(a.json).write_text(json.dumps(summary))


RESOLVED_KEYS = (
    "quantization",
    "double_quant",
    "compute_dtype",
    "gradient_checkpointing",
    "optim",
    "attn_implementation",
    "use_liger_kernel",
    "precompute_ref_log_probs",
    "group_by_length",
    "batch_size",
    "gradient_accumulation_steps",
    "max_length",
)


def child_hp(a: argparse.Namespace) -> dict[str, Any]:
    """The hyperparameters the parent handed this child (the tiny shape's HP when it handed none)."""
    return {
        "beta": a.beta,
        "learning_rate": a.learning_rate,
        "batch_size": a.batch_size or HP["batch_size"],
        "gradient_accumulation_steps": a.grad_accum,
        "max_length": a.max_length,
    }


def full_data_loss(model: Path, data: Path, adapter: Path) -> float:
    """IPO loss of ``adapter`` over every pair of ``data`` (TRL's own evaluation, fp32 on CPU, untimed)."""
    import logging

    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    for name in ("transformers", "trl", "datasets", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    # the adapter merged into the base vs the base itself (a PeftModel handed to DPOTrainer would get a copy
    # of its own adapter as the reference)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(adapter)).merge_and_unload()
    with tempfile.TemporaryDirectory(prefix="ipo-bench-eval-") as out:
        args = DPOConfig(
            output_dir=out,
            loss_type=["ipo"],
            beta=HP["beta"],
            max_length=HP["max_length"],
            per_device_eval_batch_size=HP["batch_size"],
            gradient_checkpointing=False,
            bf16=False,
            use_cpu=True,
            report_to=[],
            disable_tqdm=True,
        )
        dataset = Dataset.from_list(rows)
        trainer = DPOTrainer(
            model=policy,
            ref_model=AutoModelForCausalLM.from_pretrained(model),
            args=args,
            train_dataset=dataset,
            eval_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(model),
        )
        return float(trainer.evaluate()["eval_loss"])


# ---------------------------------------------------------------------------------------------- runs


def run_child(cmd: list[str], json_out: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(json_out.read_text())
    result["process_wall_s"] = wall
    return result


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


def reference_cmd(
    common: list[str], out: Path, json_out: Path, seed: int, hp: dict[str, Any] = HP, qlora: bool = False
) -> list[str]:
    accum = hp.get("gradient_accumulation_steps", 1)
    return [
        sys.executable,
        "bench/reference_trl.py",
        *common,
        "--out",
        str(out),
        "--json",
        str(json_out),
        "--batch-size",
        str(hp["batch_size"]),
        *(["--gradient-accumulation-steps", str(accum)] if accum != 1 else []),
        "--beta",
        str(hp["beta"]),
        "--learning-rate",
        str(hp["learning_rate"]),
        "--max-length",
        str(hp["max_length"]),
        "--seed",
        str(seed),
        *(["--qlora"] if qlora else []),
    ]


def project_cmd(
    common: list[str], out: Path, json_out: Path, seed: int, cache: Path, hp: dict[str, Any] = HP
) -> list[str]:
    hp_args = [
        "--beta",
        str(hp["beta"]),
        "--learning-rate",
        str(hp["learning_rate"]),
        "--batch-size",
        str(hp["batch_size"]),
        "--grad-accum",
        str(hp.get("gradient_accumulation_steps", 1)),
        "--max-length",
        str(hp["max_length"]),
    ]
    return [
        sys.executable,
        "-m",
        "bench.train_throughput",
        "--child-project",
        *common,
        *(hp_args if hp is not HP else []),
        "--out",
        str(out),
        "--json",
        str(json_out),
        "--seed",
        str(seed),
        "--cache-dir",
        str(cache),
    ]


def run_interleaved(
    label: str,
    common: list[str],
    modes: list[str],
    repeats: int,
    out_root: Path,
    json_root: Path,
    hp: dict[str, Any] = HP,
    qlora: bool = False,
) -> tuple[dict[str, list[dict[str, Any]]], list[float]]:
    """(a) and (b) ``repeats`` times, alternating which goes first (a b, b a, ...), repeat i with seed
    42+i; then (b) once more on the cache repeat 0 filled ("warm": a retry, resume or repeated job).
    Returns each mode's child results and the load average before each run."""
    runs: dict[str, list[dict[str, Any]]] = {"reference": [], "project": [], "warm": []}
    loads: list[float] = []
    for i in range(repeats):
        seed = HP["seed"] + i
        for mode in ["reference", "project"] if i % 2 == 0 else ["project", "reference"]:
            if mode not in modes:
                continue
            out, json_out = out_root / f"{mode}-{i}", json_root / f"{mode}.json"
            loads.append(os.getloadavg()[0])
            if mode == "reference":
                cmd = reference_cmd(common, out, json_out, seed, hp, qlora=qlora)
            else:  # a fresh cache each repeat: the cold case, reference log-probs computed
                cmd = project_cmd(common, out, json_out, seed, out_root / f"cache-{i}", hp)
            r = run_child(cmd, json_out)
            r["seed"], r["repeat"] = seed, i
            runs[mode].append(r)
            print(f"[{label}] {mode} #{i}: {r}", flush=True)
    if "warm" in modes and runs["project"]:
        out, json_out = out_root / "warm", json_root / "warm.json"
        loads.append(os.getloadavg()[0])
        r = run_child(project_cmd(common, out, json_out, HP["seed"], out_root / "cache-0", hp), json_out)
        r["seed"], r["repeat"] = HP["seed"], 0
        r["adapter"] = r.get("adapter") or str(out)
        runs["warm"].append(r)
        print(f"[{label}] warm: {r}", flush=True)
    return runs, loads


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def speed_text(mode: str, rs: list[dict[str, Any]], tps: Any) -> str:
    """Median tokens/s (and each run's), median training time, and (b)'s reference-pass time."""
    text = (
        f"median {median([tps(r) for r in rs]):.0f} tok/s ({', '.join(f'{tps(r):.0f}' for r in rs)}), "
        f"train {median([r['train_s'] for r in rs]):.1f}s"
    )
    if mode != "reference":
        text += f" (ref log-probs {median([r['ref_logps_s'] for r in rs]):.1f}s)"
    return text


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


# ---------------------------------------------------------------------------------------------- mistral-7b


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f} GiB"


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "mistral-7b"], default="tiny")
    p.add_argument("--variant", choices=["demo", "varlen", "both"], default="both", help="(--shape tiny)")
    p.add_argument("--max-steps", type=int, default=None, help="default 40 (tiny), 20 (mistral-7b)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--modes", default=None, help="default reference,project,warm,e2e (tiny), reference,project (7b)")
    p.add_argument(
        "--repeats", type=int, default=None, help="(a)/(b) runs each, interleaved; the row gives medians. Default 3/1"
    )
    p.add_argument("--batch-size", type=int, default=None, help="pairs per micro-batch (--shape mistral-7b; default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (--shape mistral-7b)")
    p.add_argument("--layers", type=int, default=None, help="shrink mistral-7b to N layers (CPU smoke tests)")
    p.add_argument("--hidden-size", type=int, default=None, help="shrink mistral-7b's hidden size (multiple of 128)")
    p.add_argument("--model-cache", default=None, help="where the mistral-7b model directory is built once")
    p.add_argument("--no-record", action="store_true", help="print the mistral-7b row, leave RESULTS.md alone")
    p.add_argument("--child-project", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=HP["seed"], help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
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
    else:
        check_shape_args(p, a)
    wait_for_quiet()
    if a.shape == "mistral-7b":
        with tempfile.TemporaryDirectory(prefix="ipo-bench-train-") as tmp:
            bench_shape(a, Path(tmp))
        return
    model = tiny_model_dir()
    with tempfile.TemporaryDirectory(prefix="ipo-bench-train-") as tmp:
        for variant in ["demo", "varlen"] if a.variant == "both" else [a.variant]:
            bench_variant(variant, a, model, Path(tmp))


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


if __name__ == "__main__":
    main()
