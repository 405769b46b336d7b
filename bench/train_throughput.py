"""Training throughput: a docs-style TRL script vs this project's trainer vs a full job through the stack.

    python -m bench.train_throughput [--variant demo|varlen|both] [--max-steps 40] [--device cpu|cuda]
                                     [--modes reference,project,e2e]

Same tiny model, same data, same hyperparameters and seed for every mode:

(a) ``reference``: bench/reference_trl.py (DPOConfig/DPOTrainer as the TRL docs write them), a child process;
(b) ``project``:   ``worker.training.run.train(TrainRequest(...), ListReporter())`` in a child process;
(c) ``e2e``:       ``ipo serve`` + ``ipo worker``; upload -> create -> poll until ``succeeded``.

Throughput = non-pad prompt+completion tokens the run trained on (TRL's ``num_tokens``: the attention-mask
sum of every batch, prompt+chosen and prompt+rejected rows; cross-checked against our own count with the
chat template, which is exact when the steps cover whole epochs, as 40 x 8 = 320 does) divided by the
training-loop time: ``trainer.train()`` for (a); from the trainer's "training ..." event to
its last step's metrics report for (b). (c) is reported as end-to-end wall time against (a)'s whole
process wall time (interpreter start to adapter saved). ``varlen`` pads half of the prompts with 1-6
extra sentences, so batches mix short and long rows (what padding-aware batching would help).
Targets: (b) >= 1.3x (a) tokens/s; (c) - (a) wall < 5 s + 3% of (a).
"""

from __future__ import annotations

import argparse
import json
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
        seed=HP["seed"],
        method=Method.model_validate(method_block(a.max_steps)),
        device=a.device,
    )
    code = train(request, reporter)
    if code != 0:
        raise SystemExit(f"train() returned {code}: {[r.message for r in reporter.of_kind('error')]}")
    started = next(r.time for r in reporter.of_kind("event") if (r.message or "").startswith("training "))
    train_metrics = [r for r in reporter.of_kind("metrics") if r.data and "train_loss" in r.data]
    last = train_metrics[-1]
    done = reporter.of_kind("done")[-1]
    summary = {
        "wall_s": time.monotonic() - t_start,
        "train_s": last.time - started,
        "final_loss": last.data["train_loss"],  # type: ignore[index]
        "trl_num_tokens": (done.data or {}).get("trained_tokens"),
        "steps": last.data["step"],  # type: ignore[index]
    }
    Path(a.json).write_text(json.dumps(summary))


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
    res: dict[str, dict[str, Any]] = {}
    modes = a.modes.split(",")
    if "reference" in modes:
        out = tmp / variant / "ref"
        res["reference"] = run_child(
            [
                sys.executable,
                "bench/reference_trl.py",
                *common,
                "--out",
                str(out),
                "--json",
                str(tmp / "ref.json"),
                "--batch-size",
                str(HP["batch_size"]),
                "--beta",
                str(HP["beta"]),
                "--learning-rate",
                str(HP["learning_rate"]),
                "--max-length",
                str(HP["max_length"]),
                "--seed",
                str(HP["seed"]),
            ],
            tmp / "ref.json",
        )
        print(f"[{variant}] reference: {res['reference']}", flush=True)
    if "project" in modes:
        out = tmp / variant / "proj"
        res["project"] = run_child(
            [
                sys.executable,
                "-m",
                "bench.train_throughput",
                "--child-project",
                *common,
                "--out",
                str(out),
                "--json",
                str(tmp / "proj.json"),
            ],
            tmp / "proj.json",
        )
        print(f"[{variant}] project: {res['project']}", flush=True)
    if "e2e" in modes:
        res["e2e"] = run_e2e(model, data, a.max_steps, a.device)
        print(f"[{variant}] e2e: {res['e2e']}", flush=True)

    def tps(mode: str) -> float | None:
        # TRL's own count (attention-mask sum of the batches it trained on: non-pad prompt+completion
        # tokens); with a fixed seed both runs see the same examples. Our count is the cross-check.
        r = res.get(mode)
        return (r.get("trl_num_tokens") or tokens) / r["train_s"] if r and r.get("train_s") else None

    cells: dict[str, str] = {"variant": f"{variant} ({tokens} tok, longest {longest})"}
    for mode in ("reference", "project"):
        r = res.get(mode)
        cells[("(a) " if mode == "reference" else "(b) ") + mode] = (
            f"{tps(mode):.0f} tok/s, train {r['train_s']:.1f}s, wall {r['process_wall_s']:.1f}s, "
            f"loss {r['final_loss']:.4f}"
            if r
            else "-"
        )
    e = res.get("e2e")
    cells["(c) e2e"] = (
        f"wall {e['wall_s']:.1f}s, loss {e['final_loss']:.4f}, "
        f"trainer-reported {e['trainer_reported_tps'] or 0:.0f} tok/s"
        if e
        else "-"
    )
    ref, proj = res.get("reference"), res.get("project")
    ratio = []
    if ref and proj:
        r = tps("project") / tps("reference")  # type: ignore[operator]
        ratio.append(f"(b)/(a) tok/s = {r:.2f}x (target >= 1.30x: {'met' if r >= 1.3 else 'missed'})")
    if ref and e:
        overhead = e["wall_s"] - ref["process_wall_s"]
        budget = 5 + 0.03 * ref["process_wall_s"]
        ratio.append(
            f"(c)-(a) wall = {overhead:+.1f}s, (c)/(a) = {e['wall_s'] / ref['process_wall_s']:.2f}x "
            f"(target < {budget:.1f}s: {'met' if overhead < budget else 'missed'})"
        )
    cells["ratio"] = "; ".join(ratio) or "-"
    print(json.dumps(res, indent=1))
    record("train_throughput", f"train {variant} {a.max_steps} {a.device} {a.modes}", cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["demo", "varlen", "both"], default="both")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--modes", default="reference,project,e2e")
    p.add_argument("--child-project", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
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
