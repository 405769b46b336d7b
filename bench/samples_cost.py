"""What samples during training cost: the share of a run's wall time spent sampling (worker/training/samples.py).

    python -m bench.samples_cost [--max-steps 40] [--n-prompts 16] [--max-new-tokens 64] [--device cpu|cuda]

One process, the tiny model (``--model DIR`` for another), the demo data with its validation file (so the
samples are taken at each evaluation, every ``max_steps // 4`` steps, and at the end: 4 rounds). Two runs of
``worker.training.run.train`` with the same seed: (a) samples off (``n_prompts`` 0), (b) the requested
samples block (defaults: the method's, 16 prompts, 64 new tokens). Figures: (b)'s time spent sampling
(``SamplesCallback.seconds``, the "sampling took" event) as a share of (b)'s wall time, and (b)'s wall
against (a)'s. Target: sampling under 25% of the run's wall time at the defaults (it must not dominate).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import record, tiny_model_dir, wait_for_quiet

TARGET_SHARE = 0.25


def _run(model: Path, data: tuple[Path, Path], out: Path, args: argparse.Namespace, n_prompts: int) -> dict[str, Any]:
    from contracts.method import Method
    from worker.training.reporter import ListReporter
    from worker.training.request import EXIT_OK, TrainRequest
    from worker.training.run import train

    samples = {"n_prompts": n_prompts, "max_new_tokens": args.max_new_tokens}
    hp = {"max_steps": args.max_steps, "batch_size": 8, "checkpoint_every": 10_000}
    request = TrainRequest(
        job_id="bench-samples",
        attempt=1,
        model_path=str(model),
        train_file=str(data[0]),
        validation_file=str(data[1]),
        output_dir=str(out),
        seed=42,
        device=args.device,
        method=Method.model_validate({"type": "ipo", "ipo": {"hyperparameters": hp, "samples": samples}}),
    )
    reporter = ListReporter()
    started = time.monotonic()
    rc = train(request, reporter)
    wall = time.monotonic() - started
    if rc != EXIT_OK:
        raise SystemExit(f"training failed: {[r.message for r in reporter.of_kind('error')]}")
    sampled = 0.0
    for r in reporter.of_kind("event"):
        m = re.match(r"sampling took ([0-9.]+)s", r.message or "")
        if m:
            sampled = float(m.group(1))
    rounds = len([r for r in reporter.of_kind("event") if r.data and "samples" in r.data])
    return {"wall": wall, "sampled": sampled, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    from contracts.method import Samples

    defaults = Samples()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--n-prompts", type=int, default=defaults.n_prompts)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    wait_for_quiet()
    from worker.training.demo_data import write_demo_data

    model = args.model or tiny_model_dir()
    with tempfile.TemporaryDirectory(prefix="bench-samples-") as tmp:
        data = write_demo_data(Path(tmp) / "data", seed=0)
        off = _run(model, data, Path(tmp) / "off", args, 0)
        on = _run(model, data, Path(tmp) / "on", args, args.n_prompts)
    share = on["sampled"] / on["wall"]
    cells = {
        "model": model.name,
        "run": f"{args.max_steps} steps x 8 pairs, eval every {max(1, args.max_steps // 4)}, {args.device}",
        "samples": f"{args.n_prompts} prompts x 4 replies (policy/reference, greedy/sampled) x "
        f"{args.max_new_tokens} new tokens + log-probs, {on['rounds']} rounds",
        "(a) samples off": f"wall {off['wall']:.1f}s",
        "(b) samples on": f"wall {on['wall']:.1f}s, sampling {on['sampled']:.1f}s",
        "share": f"sampling = {share:.1%} of (b)'s wall (target < {TARGET_SHARE:.0%}: "
        f"{'met' if share < TARGET_SHARE else 'missed'}); (b)/(a) wall = {on['wall'] / off['wall']:.2f}x",
    }
    if args.no_record:
        print(cells)
    else:
        record(
            "samples_cost", f"samples_cost {args.max_steps} {args.n_prompts} {args.max_new_tokens} {args.device}", cells
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
