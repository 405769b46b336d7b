"""The ``--shape smollm2`` pieces of bench/train_throughput.py and bench/train_profile.py: the dialogue data, the
switches that turn the trainer's speed-ups off, the padding estimate, the child's peak RSS, the phase timer
and the argument checks (no training, no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import train_runs
from bench.dialogue_data import dialogue_rows, write_dialogue_data
from bench.train_profile import PhaseTimer
from bench.train_smollm2 import padding
from contracts.data_formats import parse_preference_file

ROOT = Path(__file__).resolve().parents[2]


def test_dialogue_data_is_deterministic_valid_and_of_mixed_lengths(tmp_path: Path) -> None:
    assert dialogue_rows(40, seed=3) == dialogue_rows(40, seed=3)
    assert dialogue_rows(40, seed=3) != dialogue_rows(40, seed=4)
    path = write_dialogue_data(tmp_path / "d" / "train.jsonl", 60, seed=0)
    examples, report = parse_preference_file(str(path))
    assert report.ok, report.summary("training file")
    assert len(examples) == 60
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(r["chosen"] != r["rejected"] for r in rows)
    assert all(r["prompt"][-1]["role"] == "user" for r in rows)
    assert any(r["prompt"][0]["role"] == "system" for r in rows)
    assert any(len(r["prompt"]) >= 4 for r in rows)  # earlier exchanges
    chars = [sum(len(m["content"]) for m in r["prompt"] + r["chosen"]) for r in rows]
    assert max(chars) > 4 * min(chars)  # mixed lengths: what length grouping is for


def test_padding_estimate_grouped_pads_less_than_shuffled(tmp_path: Path, tiny_models_dir: Path) -> None:
    # enough pairs that transformers' mega-batches (a quarter of the data, up to 50 batches) hold many batches;
    # max_length above every row (the tiny model's tokenizer makes long rows), so lengths differ
    data = write_dialogue_data(tmp_path / "train.jsonl", 400, seed=0)
    pad = padding(tiny_models_dir / "tiny-mistral", data, batch_size=8, max_length=4096, seed=42)
    assert 1.0 <= pad["grouped"] < pad["shuffled"]


def test_switch_off_changes_only_the_named_speedups(monkeypatch: pytest.MonkeyPatch) -> None:
    from contracts.method import Method
    from worker.training import recipe

    monkeypatch.setattr(recipe, "resolve_config", recipe.resolve_config)  # restored after the test
    method = Method.model_validate(train_runs.method_block(12, samples=0))
    kwargs: dict[str, Any] = {
        "n_train_examples": 96,
        "model_config_dict": {"hidden_size": 64, "num_hidden_layers": 2},
        "device": "cpu",
    }
    before = recipe.resolve_config(method, **kwargs)
    assert before.group_by_length and before.precompute_ref_log_probs
    train_runs.switch_off(["precompute"])
    after = recipe.resolve_config(method, **kwargs)
    assert not after.precompute_ref_log_probs and after.group_by_length
    assert after.model_copy(update={"precompute_ref_log_probs": True}) == before
    with pytest.raises(ValueError, match="unknown speed-up"):
        train_runs.switch_off(["liger"])


def test_method_block_samples_switch() -> None:
    assert "samples" not in train_runs.method_block(4)["ipo"]
    assert train_runs.method_block(4, samples=0)["ipo"]["samples"] == {"n_prompts": 0}


def test_project_cmd_passes_switches_and_cache() -> None:
    cmd = train_runs.project_cmd(["--model", "m"], Path("o"), Path("j"), 43, None, without=["precompute"], samples=0)
    assert "--cache-dir" not in cmd
    assert cmd[cmd.index("--without") + 1] == "precompute" and cmd[cmd.index("--samples") + 1] == "0"
    cmd = train_runs.project_cmd(["--model", "m"], Path("o"), Path("j"), 43, Path("c"))
    assert cmd[cmd.index("--cache-dir") + 1] == "c" and "--without" not in cmd and "--samples" not in cmd


def test_run_child_reports_the_childs_own_peak_rss(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    big = 200 * 2**20
    own = "from bench.train_runs import own_peak_rss_bytes as p; import json; "
    code = f"b = b'x' * {big}; {own}open({str(out)!r}, 'w').write(json.dumps({{'peak_rss_bytes': p()}}))"
    r = train_runs.run_child([sys.executable, "-c", code], out)
    assert r["peak_rss_bytes"] >= big and r["process_cpu_s"] > 0
    small = train_runs.run_child([sys.executable, "-c", code.replace(str(big), "1")], out)
    assert small["peak_rss_bytes"] < big  # that process alone, not the largest child so far nor this one
    bare = train_runs.run_child([sys.executable, "-c", f"b = b'x' * {big}; open({str(out)!r}, 'w').write('{{}}')"], out)
    assert bare["peak_rss_bytes"] >= big  # no report of its own: ru_maxrss from os.wait4
    with pytest.raises(RuntimeError, match="boom"):
        train_runs.run_child([sys.executable, "-c", "raise SystemExit('boom')"], out)


def test_phase_timer_is_exclusive_and_attributes_minor_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.train_profile as tp

    clock = [0.0]
    monkeypatch.setattr(tp.time, "perf_counter", lambda: clock[0])

    def spend(seconds: float) -> None:
        clock[0] += seconds

    timer = PhaseTimer()
    timer.counting = True
    with timer.phase("forward"):
        spend(1.0)
        with timer.phase("LoRA", minor=True):
            spend(2.0)
            with timer.phase("base", minor=True):
                spend(4.0)
        with timer.phase("callbacks"):
            spend(8.0)
    assert dict(timer.totals) == {"forward": 7.0, "callbacks": 8.0}  # minor parts count to their phase, once
    assert dict(timer.parts) == {("forward", "LoRA"): 2.0, ("forward", "base"): 4.0}
    timer.counting = False
    with timer.phase("forward"):
        spend(16.0)
    assert timer.totals["forward"] == 7.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shape", "smollm2", "--layers", "1"], "go with --shape mistral-7b"),
        (["--shape", "smollm2", "--model", "/nonexistent"], "no config.json"),
        (["--shape", "tiny", "--model", "/x"], "--model goes with --shape smollm2"),
    ],
)
def test_smollm2_argument_checks(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.train_throughput", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and message in done.stderr
