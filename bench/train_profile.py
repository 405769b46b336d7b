"""Where a training step's time goes: the project's trainer (or the plain TRL script) on SmolLM2-135M-Instruct.

    python -m bench.train_profile [--target project|reference|both] [--max-steps 8] [--model DIR] [--no-record]

Trains ``--max-steps`` steps in this process on bench/dialogue_data.py's dialogues with the hyperparameters
of ``--shape smollm2`` (bench/train_smollm2.py ``HP_SMOLLM2``; sampling during training off, as there), and
measures every step after the first (allocations, first-touch) in two ways:

1. Wall-clock phases, exclusive (a phase's time minus the phases it calls): the methods each optimiser step
   goes through in transformers' ``Trainer._inner_training_loop`` are wrapped with timers: fetching and
   collating the batch (``get_batch_samples``), forward + loss (``compute_loss``), of which the LoRA
   adapters' own forward (each ``peft`` LoRA ``Linear`` minus its frozen base layer), backward
   (``Accelerator.backward``), gradient clipping, the optimiser step, the scheduler, the trainer callbacks
   (reporting, stop, non-finite guard: ``CallbackHandler.call_event``) and logging / checkpointing
   (``_maybe_log_save_evaluate``, callbacks excluded). "other" is the loop's time outside all of them.
2. One step (the middle one) under ``torch.profiler`` (CPU): the top operators by self time, and the share
   of the matrix products whose shapes carry the LoRA rank (the adapters' matmuls, forward and backward).

The table goes to the ``train_profile`` section of bench/RESULTS.md (``--no-record``: print only). Python
timers cost a few microseconds a call (about 1,000 wrapped calls a step), under 1% of a step here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench._common import record
from bench.dialogue_data import write_dialogue_data
from bench.train_runs import method_block
from bench.train_smollm2 import DATA, HP_SMOLLM2, smollm2_model_dir

LORA_RANK = 16  # method_block's LoRA r
PHASES = (
    "batch (fetch + collate)",
    "forward + loss",
    "backward",
    "grad clip",
    "optimizer step",
    "lr scheduler",
    "callbacks (reporting, guards)",
    "log / checkpoint",
)
LORA = "LoRA adapters"
BASE = "frozen base linear"


class PhaseTimer:
    """Wall time per phase, exclusive of the phases it calls. "Minor" labels (the LoRA adapters, the base
    layers they wrap) count towards the nearest enclosing phase and are also kept per phase in ``parts``.
    Only what runs while ``counting`` is on is kept (the first step and the profiled one are not)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.parts: dict[tuple[str, str], float] = defaultdict(float)
        self.counting = False
        self._stack: list[list[Any]] = []  # [label, minor, start, child time]

    @contextlib.contextmanager
    def phase(self, label: str, minor: bool = False) -> Iterator[None]:
        frame: list[Any] = [label, minor, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            spent = time.perf_counter() - frame[2]
            if self._stack:
                self._stack[-1][3] += spent
            if self.counting:
                own = spent - frame[3]
                if not minor:
                    self.totals[label] += own
                else:
                    major = next((f[0] for f in reversed(self._stack) if not f[1]), "other")
                    self.totals[major] += own
                    self.parts[(major, label)] += own

    def wrap(self, owner: Any, name: str, label: str, minor: bool = False) -> None:
        """Replace ``owner.name`` (a class or an instance attribute) by a timed call of the original."""
        original: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(label, minor):
                return original(*args, **kwargs)

        setattr(owner, name, timed)


def instrument(timer: PhaseTimer, profile_step: int, max_steps: int, out: dict[str, Any]) -> None:
    """Wrap the training loop's methods (class level: they apply to the project's ``IpoDPOTrainer`` and to
    the plain ``DPOTrainer`` alike) and, at ``train()``, each LoRA layer of the model; count from the end of
    step 1 to the end of the run, except step ``profile_step``, which runs under ``torch.profiler``.
    Results land in ``out`` (``loop_s``, ``steps``, ``profiler``, the trainer's settings)."""
    import torch
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import Trainer
    from transformers.trainer_callback import CallbackHandler
    from trl import DPOTrainer

    timer.wrap(Trainer, "get_batch_samples", PHASES[0])
    timer.wrap(DPOTrainer, "compute_loss", PHASES[1])
    timer.wrap(Accelerator, "backward", PHASES[2])
    timer.wrap(Trainer, "_clip_grad_norm", PHASES[3])
    timer.wrap(AcceleratedOptimizer, "step", PHASES[4])
    timer.wrap(CallbackHandler, "call_event", PHASES[6])
    original_log = Trainer._maybe_log_save_evaluate
    window: dict[str, Any] = {"start": None, "from": 0, "profiler": None}

    def close_window(step: int) -> None:
        if window["start"] is not None:
            out["loop_s"] = out.get("loop_s", 0.0) + time.perf_counter() - window["start"]
            out["steps"] = out.get("steps", 0) + step - window["from"]
        window["start"], timer.counting = None, False

    def open_window(step: int) -> None:
        window["start"], window["from"], timer.counting = time.perf_counter(), step, True

    @functools.wraps(original_log)
    def log_save_evaluate(self: Any, *args: Any, **kwargs: Any) -> Any:
        with timer.phase(PHASES[7]):
            result = original_log(self, *args, **kwargs)
        step = self.state.global_step
        if step == profile_step and window["profiler"] is not None:
            window["profiler"].stop()
            out["profiler"], window["profiler"] = window["profiler"], None
            out["profiled_step_s"] = time.perf_counter() - window["profiled_start"]
        if step == 1 or (step == profile_step and step < max_steps):
            open_window(step)
        if step == profile_step - 1:
            close_window(step)
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
            window["profiler"], window["profiled_start"] = prof, time.perf_counter()
            prof.start()
        elif step == max_steps:
            close_window(step)
        return result

    Trainer._maybe_log_save_evaluate = log_save_evaluate  # type: ignore[method-assign]
    timer.wrap(torch.optim.lr_scheduler.LRScheduler, "step", PHASES[5])
    original_train = Trainer.train

    @functools.wraps(original_train)
    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        from peft.tuners.lora.layer import LoraLayer

        for module in self.model.modules():
            if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
                timer.wrap(module, "forward", LORA, minor=True)  # instance attribute: nn.Module.__call__ finds it
                timer.wrap(module.base_layer, "forward", BASE, minor=True)
        out["gradient_checkpointing"] = bool(self.args.gradient_checkpointing)
        out["precompute_ref_log_probs"] = bool(getattr(self.args, "precompute_ref_log_probs", False))
        out["sampler"] = type(self._get_train_sampler()).__name__
        return original_train(self, *args, **kwargs)

    Trainer.train = train  # type: ignore[method-assign]


def run_project(model: Path, data: Path, out_dir: Path, max_steps: int) -> None:
    """The project's trainer, in process, exactly as ``worker.training.run.train`` runs a job (no cache)."""
    from contracts.method import Method
    from worker.training.reporter import ListReporter
    from worker.training.request import TrainRequest
    from worker.training.run import train

    reporter = ListReporter()
    request = TrainRequest(
        job_id="ftjob-profile",
        attempt=1,
        model_path=str(model),
        train_file=str(data),
        output_dir=str(out_dir),
        method=Method.model_validate(method_block(max_steps, HP_SMOLLM2, samples=0)),
        device="cpu",
    )
    if train(request, reporter) != 0:
        raise SystemExit(f"train() failed: {[r.message for r in reporter.of_kind('error')]}")


def run_reference(model: Path, data: Path, out_dir: Path, max_steps: int) -> None:
    """bench/reference_trl.py's ``main`` in process, with the same hyperparameters."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import reference_trl

    hp = HP_SMOLLM2
    argv = ["reference_trl.py", "--model", str(model), "--data", str(data), "--out", str(out_dir)]
    argv += ["--max-steps", str(max_steps), "--batch-size", str(hp["batch_size"]), "--beta", str(hp["beta"])]
    argv += ["--learning-rate", str(hp["learning_rate"]), "--max-length", str(hp["max_length"])]
    saved, sys.argv = sys.argv, argv
    try:
        reference_trl.main()
    finally:
        sys.argv = saved


def lora_matmul_share(profiler: Any) -> tuple[float, float]:
    """(self CPU seconds of matrix products with the LoRA rank in an input shape, of all matrix products)."""
    lora = total = 0.0
    for event in profiler.key_averages(group_by_input_shape=True):
        if event.key not in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
            continue
        seconds = event.self_cpu_time_total / 1e6
        total += seconds
        if any(LORA_RANK in shape for shape in event.input_shapes if shape):
            lora += seconds
    return lora, total


def top_ops(profiler: Any, n: int = 8) -> list[tuple[str, float]]:
    """The ``n`` operators with the most self CPU time, each with the input shapes that cost the most."""
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    by_shape = sorted(
        profiler.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total, reverse=True
    )
    out = []
    for e in events[:n]:
        worst = next((x for x in by_shape if x.key == e.key), None)
        shapes = [s for s in (worst.input_shapes if worst else []) if s][:2]
        share = worst.self_cpu_time_total / max(e.self_cpu_time_total, 1e-9) if worst else 0.0
        out.append((f"{e.key} (largest: {shapes} {100 * share:.0f}%)", e.self_cpu_time_total / 1e6))
    return out


def profile(target: str, model: Path, max_steps: int, tmp: Path) -> dict[str, Any]:
    """Train ``max_steps`` steps of ``target`` (this process) with the timers on; returns the figures."""
    data = write_dialogue_data(tmp / "dialogue.jsonl", max_steps * HP_SMOLLM2["batch_size"], seed=0, **DATA)
    timer, out = PhaseTimer(), dict[str, Any](target=target)
    instrument(timer, max_steps // 2 + 1, max_steps, out)
    load = os.getloadavg()
    (run_project if target == "project" else run_reference)(model, data, tmp / target, max_steps)
    out["load"] = (load[0], os.getloadavg()[0])
    phases = {name: timer.totals.get(name, 0.0) for name in PHASES}
    phases["other"] = max(0.0, out.get("loop_s", 0.0) - sum(timer.totals.values()))
    out["phases"] = phases
    out["lora_s"] = {major: s for (major, label), s in timer.parts.items() if label == LORA}
    prof = out.pop("profiler", None)
    if prof is not None:
        out["lora_matmul_s"], out["matmul_s"] = lora_matmul_share(prof)
        out["top_ops"] = top_ops(prof)
    return out


def table(result: dict[str, Any]) -> str:
    """Each phase's seconds per step and share of the timed loop; the LoRA adapters' part of each phase."""
    steps = max(1, int(result.get("steps", 1)))
    loop = result.get("loop_s", 0.0) or float("nan")
    rows = []
    for name, seconds in result["phases"].items():
        row = f"{name} {seconds / steps:.2f}s ({100 * seconds / loop:.0f}%)"
        lora = result["lora_s"].get(name)
        if lora:
            row += f" [LoRA adapters {lora / steps:.2f}s, {100 * lora / loop:.0f}%]"
        rows.append(row)
    return ", ".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=["project", "reference", "both"], default="project")
    p.add_argument("--max-steps", type=int, default=8, help="steps to train (the first is not counted)")
    p.add_argument("--model", default=None, help="a local model directory instead of the cached SmolLM2")
    p.add_argument("--no-record", action="store_true", help="print the rows, leave RESULTS.md alone")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--record-from", default=None, help="record the rows of a --json file an earlier run wrote")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.record_from:
        saved = json.loads(Path(a.record_from).read_text())
        record_rows(saved if isinstance(saved, list) else [saved], a.max_steps, a.no_record)
        return
    if a.max_steps < 4:
        p.error("--max-steps must be >= 4 (step 1 is not counted, the middle step is profiled)")
    model = Path(a.model) if a.model else smollm2_model_dir()
    targets = ["project", "reference"] if a.target == "both" else [a.target]
    if len(targets) > 1 and not a.child:  # each in its own process: the wrappers patch classes
        import subprocess

        results = []
        for target in targets:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, "-m", "bench.train_profile", "--child", "--target", target]
                cmd += ["--max-steps", str(a.max_steps), "--model", str(model), "--json", f.name, "--no-record"]
                subprocess.run(cmd, check=True)
                results.append(json.loads(Path(f.name).read_text()))
    else:
        with tempfile.TemporaryDirectory(prefix="ipo-bench-profile-") as tmp:
            results = [profile(targets[0], model, a.max_steps, Path(tmp))]
    if a.json:
        Path(a.json).write_text(json.dumps(results[0] if len(results) == 1 else results, default=str))
    record_rows(results, a.max_steps, a.no_record)


def record_rows(results: list[dict[str, Any]], max_steps: int, no_record: bool) -> None:
    """One ``train_profile`` row per target (printed only with ``no_record``)."""
    for r in results:
        steps = max(1, int(r.get("steps", 1)))
        cells = {
            "target": f"{r['target']} (gradient checkpointing {r['gradient_checkpointing']}, precomputed reference "
            f"{r['precompute_ref_log_probs']}, sampler {r['sampler']})",
            "run": f"{r.get('steps')} steps timed after step 1, batch {HP_SMOLLM2['batch_size']} pairs, max_length "
            f"{HP_SMOLLM2['max_length']}; load {r['load'][0]:.1f} -> {r['load'][1]:.1f}",
            "per step": f"{r.get('loop_s', 0.0) / steps:.2f}s",
            "phases (per step, share)": table(r),
            "torch.profiler (one step)": (
                f"LoRA-rank matmuls {r.get('lora_matmul_s', 0):.2f}s of {r.get('matmul_s', 0):.2f}s matmul self time "
                f"({100 * r.get('lora_matmul_s', 0) / max(r.get('matmul_s', 0), 1e-9):.0f}%); top ops: "
                + ", ".join(f"{k} {v:.2f}s" for k, v in r.get("top_ops", []))
            ),
        }
        if no_record:
            print(f"[train_profile] {'; '.join(f'{k}: {v}' for k, v in cells.items())}")
        else:
            record("train_profile", f"profile smollm2 {r['target']} {max_steps}", cells)


if __name__ == "__main__":
    main()
