"""The acceptance bar: a real IPO run on the demo data teaches the tiny model the preference."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from contracts.method import Method
from worker.training.evaluate import evaluate_model, load_model, load_pairs
from worker.training.reporter import ListReporter
from worker.training.request import EXIT_OK, TrainRequest
from worker.training.run import train


@pytest.mark.slow
def test_ipo_learns_the_demo_preference(tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path) -> None:
    train_file, valid_file = demo_files
    pairs = load_pairs(valid_file)
    model, tok = load_model(tiny_model_dir)
    before = evaluate_model(model, tok, pairs, samples=4, seed=0)

    request = TrainRequest(
        job_id="learn",
        attempt=1,
        model_path=str(tiny_model_dir),
        train_file=str(train_file),
        validation_file=str(valid_file),
        output_dir=str(tmp_path / "run"),
        seed=0,
        device="cpu",
        method=Method(type="ipo"),  # every value "auto"
    )
    reporter = ListReporter()
    started = time.monotonic()
    assert train(request, reporter) == EXIT_OK
    seconds = time.monotonic() - started

    model, tok = load_model(tiny_model_dir, tmp_path / "run" / "adapter")
    after = evaluate_model(model, tok, pairs, samples=4, seed=0)
    print(
        f"\npreference accuracy {before.preference_accuracy:.2f} -> {after.preference_accuracy:.2f}; "
        f"behaviour rate {before.behaviour_rate:.2f} -> {after.behaviour_rate:.2f}; training {seconds:.0f}s"
    )
    assert 0.2 <= before.preference_accuracy <= 0.8  # about chance before
    assert after.preference_accuracy >= 0.9
    assert after.behaviour_rate is not None and before.behaviour_rate is not None
    assert after.behaviour_rate > 0.8 and after.behaviour_rate > before.behaviour_rate + 0.2
    valid = [r.data for r in reporter.of_kind("metrics") if r.data and "valid_preference_accuracy" in r.data]
    assert valid[-1]["valid_preference_accuracy"] >= 0.9
