"""A stand-in for ``python -m worker.training.run`` that honours the child contract, fast and without torch.

Usage: ``fake_trainer.py REQUEST_JSON --report-fd N``. Behaviour from the environment:

- ``FAKE_MODE``: ``ok`` (default), ``crash`` (exit 3 after ``FAKE_CRASH_AT`` steps), ``killed`` (SIGKILL
  itself), ``error`` (report ``nan_loss`` and exit 1), ``stubborn`` (ignore SIGTERM/SIGUSR1);
- ``FAKE_STEPS`` (default 5), ``FAKE_DELAY`` seconds per step (default 0), ``FAKE_CHECKPOINT_EVERY``;
- ``FAKE_HELPER=1``: fork a helper process (like a dataloader worker) into the same process group and
  write its pid to ``output_dir/helper.pid``.

SIGUSR1 saves a checkpoint, reports it and exits 75; SIGTERM exits 75 at the next step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

requested: dict[str, bool] = {"pause": False, "cancel": False}


def on_signal(signum: int, frame: FrameType | None) -> None:
    requested["pause" if signum == signal.SIGUSR1 else "cancel"] = True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("request")
    parser.add_argument("--report-fd", type=int, required=True)
    args = parser.parse_args()
    request = json.loads(Path(args.request).read_text())
    out = Path(request["output_dir"])
    report_file = os.fdopen(args.report_fd, "w", buffering=1)

    def report(kind: str, **fields: Any) -> None:
        report_file.write(json.dumps({"kind": kind, "time": time.time(), **fields}) + "\n")

    mode = os.environ.get("FAKE_MODE", "ok")
    steps = int(os.environ.get("FAKE_STEPS", "5"))
    delay = float(os.environ.get("FAKE_DELAY", "0"))
    checkpoint_every = int(os.environ.get("FAKE_CHECKPOINT_EVERY", "0"))
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGUSR1, on_signal)
    if os.environ.get("FAKE_HELPER") == "1":
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        helper = subprocess.Popen([sys.executable, "-c", code])
        (out / "helper.pid").write_text(str(helper.pid))

    def save_checkpoint(step: int) -> None:
        ckpt = out / "checkpoints" / f"step-{step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "adapter_model.safetensors").write_bytes(b"weights-%d" % step)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        report("checkpoint", step=step, path=str(ckpt), data={"step": step, "train_loss": 1.0 / step})

    start = 0
    if request.get("resume_from"):
        start = json.loads((Path(request["resume_from"]) / "trainer_state.json").read_text())["global_step"]
        report("event", message=f"Resumed from step {start}")
    report("resolved", data={"beta": 0.1, "n_epochs": 1, "batch_size": 2, "total_steps": steps})
    report("event", message="Training started")
    for step in range(start + 1, steps + 1):
        if requested["pause"]:
            save_checkpoint(step - 1)
            return 75
        if requested["cancel"]:
            return 75
        time.sleep(delay)
        if mode == "crash" and step == int(os.environ.get("FAKE_CRASH_AT", "2")):
            print("Traceback: simulated crash", file=sys.stderr, flush=True)
            return 3
        if mode == "killed" and step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "error" and step == 2:
            report("error", code="nan_loss", message="Loss became NaN at step 2.")
            return 1
        report(
            "metrics",
            step=step,
            data={"step": step, "total_steps": steps, "train_loss": round(1.0 / step, 4), "trained_tokens": 100 * step},
        )
        if checkpoint_every and step % checkpoint_every == 0:
            save_checkpoint(step)
    adapter = out / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16}))
    (adapter / "adapter_model.safetensors").write_bytes(b"final-weights")
    report("artifact", name="adapter", path=str(adapter))
    metrics = out / "metrics.csv"
    metrics.write_text("step,train_loss\n" + "".join(f"{s},{1.0 / s:.4f}\n" for s in range(1, steps + 1)))
    report("artifact", name="metrics", path=str(metrics))
    report("done", data={"trained_tokens": 100 * steps})
    return 0


if __name__ == "__main__":
    sys.exit(main())
