"""Training throughput: a docs-style TRL script vs this project's trainer vs a full job through the stack.

    python -m bench.train_throughput [--variant demo|varlen|both] [--max-steps 40] [--device cpu|cuda]
                                     [--modes reference,project,warm,e2e] [--repeats 3]

Same tiny model, same data, same hyperparameters for every mode:

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

HP = {"beta": 0.5, "learning_rate": 1e-3, "batch_size": 8, "max_length": 256, "seed": 42}
FILLER = (
    "Please think about the numbers before you answer.",
    "The answer should be one short sentence.",
    "Do not give the product when the sum is asked.",
    "Small numbers are easy to add.",
    "Tell me the result and nothing else.",
)


def method_block(max_steps: int) -> dict[str, Any]:
    return {
        "type": "ipo",
        "ipo": {
            "hyperparameters": {
                "beta": HP["beta"],
                "learning_rate": HP["learning_rate"],
                "batch_size": HP["batch_size"],
                "gradient_accumulation_steps": 1,
                "max_length": HP["max_length"],
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


def count_tokens(model: Path, data: Path, n_examples: int) -> tuple[int, int, int]:
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
            truncated += n > HP["max_length"]
            total += min(n, HP["max_length"])
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
        method=Method.model_validate(method_block(a.max_steps)),
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
    done = reporter.of_kind("done")[-1]
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
    }
    Path(a.json).write_text(json.dumps(summary))


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
            loss_type="ipo",
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


def reference_cmd(common: list[str], out: Path, json_out: Path, seed: int) -> list[str]:
    return [
        sys.executable,
        "bench/reference_trl.py",
        *common,
        "--out",
        str(out),
        "--json",
        str(json_out),
        "--batch-size",
        str(HP["batch_size"]),
        "--beta",
        str(HP["beta"]),
        "--learning-rate",
        str(HP["learning_rate"]),
        "--max-length",
        str(HP["max_length"]),
        "--seed",
        str(seed),
    ]


def project_cmd(common: list[str], out: Path, json_out: Path, seed: int, cache: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.train_throughput",
        "--child-project",
        *common,
        "--out",
        str(out),
        "--json",
        str(json_out),
        "--seed",
        str(seed),
        "--cache-dir",
        str(cache),
    ]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


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
    runs: dict[str, list[dict[str, Any]]] = {"reference": [], "project": [], "warm": []}
    loads: list[float] = []
    for i in range(a.repeats):
        seed = HP["seed"] + i
        order = ["reference", "project"] if i % 2 == 0 else ["project", "reference"]
        for mode in order:
            if mode not in modes:
                continue
            out, json_out = tmp / variant / f"{mode}-{i}", tmp / f"{mode}.json"
            loads.append(os.getloadavg()[0])
            if mode == "reference":
                cmd = reference_cmd(common, out, json_out, seed)
            else:  # a fresh cache each repeat: the cold case, reference log-probs computed
                cmd = project_cmd(common, out, json_out, seed, tmp / variant / f"cache-{i}")
            r = run_child(cmd, json_out)
            r["seed"] = seed
            r["adapter"] = r.get("adapter") or str(out)
            runs[mode].append(r)
            print(f"[{variant}] {mode} #{i}: {r}", flush=True)
    if "warm" in modes and runs["project"]:
        # the cache repeat 0 filled: a retry, resume or repeated job on the same file skips the reference pass
        out, json_out = tmp / variant / "warm", tmp / "warm.json"
        loads.append(os.getloadavg()[0])
        r = run_child(project_cmd(common, out, json_out, HP["seed"], tmp / variant / "cache-0"), json_out)
        r["seed"] = HP["seed"]
        runs["warm"].append(r)
        print(f"[{variant}] warm: {r}", flush=True)
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
        text = (
            f"median {median([tps(r) for r in rs]):.0f} tok/s ({', '.join(f'{tps(r):.0f}' for r in rs)}), "
            f"train {median([r['train_s'] for r in rs]):.1f}s"
        )
        if mode != "reference":
            text += f" (ref log-probs {median([r['ref_logps_s'] for r in rs]):.1f}s)"
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
        r = median([tps(x) for x in proj]) / median([tps(x) for x in ref])
        pairs = ", ".join(f"{tps(p) / tps(q):.2f}" for p, q in zip(proj, ref, strict=False))
        ref_losses = [x["full_data_loss"] for x in ref]
        gap = abs(median([x["full_data_loss"] for x in proj]) - median(ref_losses))
        noise = max(ref_losses) - min(ref_losses)
        ratio.append(
            f"(b)/(a) tok/s = {r:.2f}x of medians (per repeat {pairs}; target >= 1.30x: "
            f"{'met' if r >= 1.3 else 'missed'}); full-data loss (b)-(a) medians {gap:.4f} vs (a)'s spread "
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
    p.add_argument("--variant", choices=["demo", "varlen", "both"], default="both")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--modes", default="reference,project,warm,e2e")
    p.add_argument("--repeats", type=int, default=3, help="(a)/(b) runs each, interleaved; the row gives medians")
    p.add_argument("--child-project", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=HP["seed"], help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_project:
        project_child(a)
        return
    wait_for_quiet()
    model = tiny_model_dir()
    with tempfile.TemporaryDirectory(prefix="ipo-bench-train-") as tmp:
        for variant in ["demo", "varlen"] if a.variant == "both" else [a.variant]:
            bench_variant(variant, a, model, Path(tmp))


if __name__ == "__main__":
    main()
