"""What every shape of bench/train_throughput.py shares: the tiny shape's hyperparameters, the method block, the
(b) child (the project's trainer in-process, with switches that turn its speed-ups off one at a time), the
(a)/(b) command lines, the interleaved runs (each child's peak RSS from ``os.wait4``) and the full-data loss."""

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

from bench._common import ROOT

HP: dict[str, Any] = {"beta": 0.5, "learning_rate": 1e-3, "batch_size": 8, "max_length": 256, "seed": 42}
FILLER = (
    "Please think about the numbers before you answer.",
    "The answer should be one short sentence.",
    "Do not give the product when the sum is asked.",
    "Small numbers are easy to add.",
    "Tell me the result and nothing else.",
)


def method_block(max_steps: int, hp: dict[str, Any] = HP, samples: int | None = None) -> dict[str, Any]:
    """The IPO method block every (b) run and the e2e job use: ``hp``'s values, one epoch capped at
    ``max_steps``, TRL's defaults where the reference keeps them (no warmup, linear schedule, pure IPO) and
    the recipe's LoRA. ``samples``: the ``samples.n_prompts`` (None: the method's default, 16; 0: off)."""
    block: dict[str, Any] = {
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
    }
    if samples is not None:
        block["samples"] = {"n_prompts": samples}
    return {"type": "ipo", "ipo": block}


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


# the project's speed-ups, and what turns each off in a (b) child (``--without NAME``, comma-separated)
SPEEDUPS: dict[str, dict[str, Any]] = {
    "group_by_length": {"group_by_length": False},  # TRL's uniform shuffle instead
    "precompute": {"precompute_ref_log_probs": False},  # the reference forward in every step instead
    # not a speed-up the project added but a default it changed: DPOConfig turns gradient checkpointing on
    # everywhere, the recipe only on CUDA for real models (activations are recomputed in backward otherwise)
    "no_checkpointing": {"gradient_checkpointing": True},
}


def switch_off(names: list[str]) -> None:
    """Make ``worker.training.recipe.resolve_config`` return its config with the speed-ups ``names`` (keys of
    ``SPEEDUPS``) turned off; the trainer then runs as it would have before each was added. The cache is
    switched off by handing the child no ``--cache-dir``. Raises ``ValueError`` for an unknown name."""
    unknown = sorted(set(names) - set(SPEEDUPS))
    if unknown:
        raise ValueError(f"unknown speed-up(s) {unknown}; choose from {sorted(SPEEDUPS)}")
    if not names:
        return
    from worker.training import recipe

    update = {k: v for name in names for k, v in SPEEDUPS[name].items()}
    resolve = recipe.resolve_config

    def resolve_without(*args: Any, **kwargs: Any) -> Any:
        return resolve(*args, **kwargs).model_copy(update=update)

    recipe.resolve_config = resolve_without  # run._resolve imports it at call time


def own_peak_rss_bytes() -> int | None:
    """This process's peak resident set since its ``exec`` (``VmHWM`` in /proc/self/status; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def count_cpu_seconds() -> dict[str, float]:
    """Wrap the trainer's training loop (``run._train_or_finish``) and its reference pass
    (``IpoDPOTrainer._precompute_ref_logps``) to add up the process's CPU seconds (``time.process_time``,
    every thread) spent in each: on a machine shared with other work the CPU time a run needs moves much less
    than its wall time. Returns the dict the wrappers fill (``train``, ``ref_logps``)."""
    import functools

    from worker.training import run
    from worker.training.trainer import IpoDPOTrainer

    spent = {"train": 0.0, "ref_logps": 0.0}

    def counted(fn: Any, key: str) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            c0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.process_time() - c0

        return wrapper

    run._train_or_finish = counted(run._train_or_finish, "train")
    IpoDPOTrainer._precompute_ref_logps = counted(IpoDPOTrainer._precompute_ref_logps, "ref_logps")  # type: ignore[method-assign]
    return spent


def project_child(a: argparse.Namespace) -> None:
    t_start, t_wall = time.monotonic(), time.time()
    from contracts.method import Method
    from worker.training.reporter import ListReporter
    from worker.training.request import TrainRequest
    from worker.training.run import train

    switch_off([n for n in (a.without or "").split(",") if n])
    cpu = count_cpu_seconds()
    reporter = ListReporter()
    request = TrainRequest(
        job_id="ftjob-bench",
        attempt=1,
        model_path=a.model,
        train_file=a.data,
        output_dir=a.out,
        seed=a.seed,
        method=Method.model_validate(method_block(a.max_steps, child_hp(a), a.samples)),
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
        "setup_s": started - t_wall,  # imports, data, model, trainer (and its reference pass) until "training"
        "train_s": last.time - started + ref_logps_s,
        "train_cpu_s": cpu["train"] + cpu["ref_logps"],
        "peak_rss_bytes": own_peak_rss_bytes(),  # CPU seconds, all threads: the same work as train_s
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


def full_data_loss(model: Path, data: Path, adapter: Path, hp: dict[str, Any] = HP) -> float:
    """IPO loss of ``adapter`` over every pair of ``data`` (TRL's own evaluation, fp32 on CPU, untimed), with
    ``hp``'s beta, max_length and batch size."""
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
            beta=hp["beta"],
            max_length=hp["max_length"],
            per_device_eval_batch_size=hp["batch_size"],
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
    """Run one (a) or (b) child to completion; its JSON summary plus ``process_wall_s`` (interpreter start to
    exit), ``process_cpu_s`` and ``peak_rss_bytes`` (the child's own CPU seconds and peak resident set,
    from ``os.wait4``: that process alone, not its siblings; the peak RSS is the child's own ``VmHWM`` when it
    reports ``peak_rss_bytes``, see ``own_peak_rss_bytes``). Raises ``RuntimeError`` with the end of its
    stderr when it fails."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read()[-4000:].decode(errors="replace")
            raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(json_out.read_text())
    result["process_wall_s"] = wall
    result["process_cpu_s"] = usage.ru_utime + usage.ru_stime
    # the child's own VmHWM when it reported one: ru_maxrss starts from the parent's RSS at fork (Linux keeps
    # the high-water mark across fork and exec), so a small child of a large parent reads as large
    result["peak_rss_bytes"] = result.get("peak_rss_bytes") or usage.ru_maxrss * 1024  # Linux: KiB
    return result


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
    common: list[str],
    out: Path,
    json_out: Path,
    seed: int,
    cache: Path | None,
    hp: dict[str, Any] = HP,
    without: list[str] | None = None,
    samples: int | None = None,
) -> list[str]:
    """The (b) child's command line: the project's trainer on ``common`` (model, data, steps, device), the
    prepared-data cache in ``cache`` (None: no cache), ``without`` the named ``SPEEDUPS``, ``samples`` prompts
    sampled during training (None: the method's default)."""
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
        *(["--cache-dir", str(cache)] if cache is not None else []),
        *(["--without", ",".join(without)] if without else []),
        *(["--samples", str(samples)] if samples is not None else []),
    ]


ABLATIONS: dict[str, dict[str, Any]] = {
    "nogroup": {"without": ["group_by_length"]},
    "noprecompute": {"without": ["precompute"]},
    "nocache": {"cache": False},
    "checkpointing": {"without": ["no_checkpointing"]},
    "samples": {"samples": "default"},
}
"""(b) with one thing changed, to measure what it contributes: a speed-up switched off (``SPEEDUPS``), no
prepared-data cache at all (what writing it costs), gradient checkpointing on (TRL's default, which the
recipe keeps off on CPU), or the method's default sampling during training."""


def run_interleaved(
    label: str,
    common: list[str],
    modes: list[str],
    repeats: int,
    out_root: Path,
    json_root: Path,
    hp: dict[str, Any] = HP,
    qlora: bool = False,
    samples: int | None = None,
    ablation_repeats: int | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], list[float]]:
    """(a), (b) and the ``ABLATIONS`` in ``modes``, ``repeats`` times, each repeat rotating which goes first
    (a b, b a, ... for two; a b c, b c a, c a b for three: drift in the machine's load hits all alike),
    repeat i with seed 42+i for all; then (b) once more on the cache repeat 0 filled ("warm": a retry,
    resume or repeated job). ``samples`` goes to every (b) child but the "samples" ablation; the ablations run
    in the first ``ablation_repeats`` repeats only (None: all). Returns each
    mode's child results (with ``load``: the 1-minute load average before and after the run) and the
    load average before each run."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in ("reference", "project", "warm", *ABLATIONS)}
    loads: list[float] = []
    rotating = [m for m in ("reference", "project", *ABLATIONS) if m in modes]
    for i in range(repeats):
        seed = HP["seed"] + i
        k = i % max(1, len(rotating))
        for mode in rotating[k:] + rotating[:k]:
            if mode in ABLATIONS and ablation_repeats is not None and i >= ablation_repeats:
                continue
            out, json_out = out_root / f"{mode}-{i}", json_root / f"{mode}.json"
            loads.append(os.getloadavg()[0])
            if mode == "reference":
                cmd = reference_cmd(common, out, json_out, seed, hp, qlora=qlora)
            else:  # a fresh cache each repeat: the cold case, reference log-probs computed
                change = ABLATIONS.get(mode, {})
                cmd = project_cmd(
                    common,
                    out,
                    json_out,
                    seed,
                    None if change.get("cache") is False else out_root / f"cache-{mode}-{i}",
                    hp,
                    without=change.get("without"),
                    samples=None if change.get("samples") == "default" else samples,
                )
            before = os.getloadavg()[0]
            r = run_child(cmd, json_out)
            r["seed"], r["repeat"], r["load"] = seed, i, (before, os.getloadavg()[0])
            runs[mode].append(r)
            print(f"[{label}] {mode} #{i}: {r}", flush=True)
    if "warm" in modes and runs["project"]:
        out, json_out = out_root / "warm", json_root / "warm.json"
        loads.append(os.getloadavg()[0])
        before = os.getloadavg()[0]
        cache = out_root / "cache-project-0"
        r = run_child(project_cmd(common, out, json_out, HP["seed"], cache, hp, samples=samples), json_out)
        r["seed"], r["repeat"], r["load"] = HP["seed"], 0, (before, os.getloadavg()[0])
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


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f} GiB"
