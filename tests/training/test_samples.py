"""Samples during training (worker/training/samples.py): a real tiny-model run reports them at each
evaluation and at the end, with both replies and the log-probabilities, and writes the result file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from contracts.method import Method, Samples
from worker.training.reporter import ListReporter
from worker.training.request import EXIT_OK, TrainRequest
from worker.training.run import train
from worker.training.samples import LOGP_KEYS


def _request(model: Path, data: tuple[Path, Path], out: Path, *, validation: bool, samples: dict[str, Any], **hp: Any):
    return TrainRequest(
        job_id="job-samples",
        attempt=1,
        model_path=str(model),
        train_file=str(data[0]),
        validation_file=str(data[1]) if validation else None,
        output_dir=str(out),
        seed=0,
        device="cpu",
        method=Method.model_validate({"type": "ipo", "ipo": {"hyperparameters": hp, "samples": samples}}),
    )


def test_samples_at_each_evaluation_and_at_the_end(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    reporter = ListReporter()
    graders = [
        {"type": "string_check", "name": "exact", "operation": "eq"},
        {"type": "text_similarity", "evaluation_metric": "fuzzy_match"},
    ]
    samples = {"n_prompts": 4, "max_new_tokens": 8, "graders": graders}
    request = _request(
        tiny_model_dir, demo_files, tmp_path / "run", validation=True, samples=samples,
        max_steps=8, batch_size=4, beta=0.1, learning_rate=5e-3, checkpoint_every=100,
    )  # fmt: skip
    assert train(request, reporter) == EXIT_OK

    events = [r for r in reporter.of_kind("event") if r.data and "samples" in r.data]
    steps = [e.data["step"] for e in events if e.data]
    assert steps == [2, 4, 6, 8]  # eval_every = 8 // 4; the end (step 8) is not sampled twice
    for e in events:
        assert e.data and e.data["source"] == "validation file" and len(e.data["samples"]) == 4
        for s in e.data["samples"]:
            assert s["prompt"] and s["chosen"].startswith("The sum is") and s["rejected"].startswith("The product")
            assert isinstance(s["policy_reply"], str) and isinstance(s["reference_reply"], str)
            assert all(isinstance(s[k], float) and s[k] < 0 for k in LOGP_KEYS)
            assert set(s["scores"]) == {"exact", "exact_reference", "text_similarity", "text_similarity_reference"}

    # the reference (adapter disabled, computed once) is the same at every step; the policy moves
    first, last = events[0].data["samples"], events[-1].data["samples"]  # type: ignore[index]
    for a, b in zip(first, last, strict=True):
        assert a["reference_logp_chosen"] == pytest.approx(b["reference_logp_chosen"], abs=1e-3)
        assert a["reference_reply"] == b["reference_reply"]
    margin = [s["policy_logp_chosen"] - s["policy_logp_rejected"] for s in last]
    ref_margin = [s["reference_logp_chosen"] - s["reference_logp_rejected"] for s in last]
    assert sum(margin) > sum(ref_margin)  # IPO raised the chosen reply relative to the rejected one
    assert any(s["policy_reply"] != s["reference_reply"] for s in last)

    metrics = [r.data for r in reporter.of_kind("metrics") if r.data and "samples/policy_logp_chosen" in r.data]
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    assert {"samples/exact", "samples/exact_reference", "samples/text_similarity"} <= set(metrics[-1])
    assert 0.0 <= metrics[-1]["samples/text_similarity"] <= 1.0

    artifacts = {r.name: Path(r.path or "") for r in reporter.of_kind("artifact")}
    rows = [json.loads(line) for line in artifacts["samples"].read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4 * 4 and [r["step"] for r in rows[::4]] == [2, 4, 6, 8]
    for row in rows:
        assert row["prompt"][0]["role"] == "user"
        for key in ("reference_reply", "policy_reply", "reference_sampled_reply", "policy_sampled_reply"):
            assert isinstance(row[key], str)
        assert all(k in row for k in LOGP_KEYS) and row["chosen"] and row["rejected"]
    assert any("sampling took" in (r.message or "") for r in reporter.of_kind("event"))


def test_without_validation_file_samples_come_from_held_out_training_prompts(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    reporter = ListReporter()
    request = _request(
        tiny_model_dir, demo_files, tmp_path / "run", validation=False,
        samples={"n_prompts": 3, "max_new_tokens": 4}, max_steps=2, batch_size=4,
    )  # fmt: skip
    assert train(request, reporter) == EXIT_OK
    held = next(r for r in reporter.of_kind("event") if r.data and "samples_holdout" in r.data)
    record = held.data["samples_holdout"]  # type: ignore[index]
    assert record["prompts"] == 3 and record["pairs"] == len(record["lines"]) >= 3  # auto: n_prompts (320 pairs)
    assert "held out of the training file" in (held.message or "") and str(record["lines"][0]) in (held.message or "")

    # the held-out lines are not trained on: the run trained on the rest, and sampled exactly those prompts
    lines = demo_files[0].read_text(encoding="utf-8").splitlines()
    held_prompts = {json.dumps(json.loads(lines[n - 1])["prompt"]) for n in record["lines"]}
    kept = [line for n, line in enumerate(lines, 1) if n not in record["lines"]]
    assert not held_prompts & {json.dumps(json.loads(line)["prompt"]) for line in kept}
    messages = [r.message or "" for r in reporter.of_kind("event")]
    assert any(f"training ipo LoRA on {len(kept)} pairs" in m for m in messages)
    assert any("3 prompts from the held-out training prompts" in m for m in messages)
    events = [r.data for r in reporter.of_kind("event") if r.data and "samples" in r.data]
    assert [e["step"] for e in events] == [1, 2] and events[0]["source"] == "held-out training prompts"
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {json.dumps(r["prompt"]) for r in rows} == held_prompts and {r["line"] for r in rows} <= set(record["lines"])

    # deterministic: the same seed holds out the same lines
    again = ListReporter()
    request = _request(
        tiny_model_dir, demo_files, tmp_path / "again", validation=False,
        samples={"n_prompts": 3, "max_new_tokens": 4}, max_steps=1, batch_size=4,
    )  # fmt: skip
    assert train(request, again) == EXIT_OK
    assert next(r.data for r in again.of_kind("event") if r.data and "samples_holdout" in r.data) == held.data


def test_holdout_zero_samples_training_prompts_and_says_so(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    reporter = ListReporter()
    request = _request(
        tiny_model_dir, demo_files, tmp_path / "run", validation=False,
        samples={"n_prompts": 2, "max_new_tokens": 4, "holdout": 0}, max_steps=1, batch_size=4,
    )  # fmt: skip
    assert train(request, reporter) == EXIT_OK
    messages = [r.message or "" for r in reporter.of_kind("event")]
    assert any("2 prompts from the training file (no validation file and none held out" in m for m in messages)
    assert any("training ipo LoRA on 320 pairs" in m for m in messages)
    assert not [r for r in reporter.of_kind("event") if r.data and "samples_holdout" in r.data]


def test_holdout_ignored_with_a_validation_file_and_refused_when_it_takes_everything(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    reporter = ListReporter()
    request = _request(
        tiny_model_dir, demo_files, tmp_path / "run", validation=True,
        samples={"n_prompts": 2, "max_new_tokens": 4, "holdout": 4}, max_steps=1, batch_size=4,
    )  # fmt: skip
    assert train(request, reporter) == EXIT_OK
    assert any("samples.holdout is ignored" in (r.message or "") for r in reporter.of_kind("event"))

    small = tmp_path / "small.jsonl"
    small.write_text("".join(demo_files[0].read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    reporter = ListReporter()
    request = _request(
        tiny_model_dir, (small, demo_files[1]), tmp_path / "small", validation=False,
        samples={"n_prompts": 4, "holdout": 4}, max_steps=1,
    )  # fmt: skip
    assert train(request, reporter) == 2  # EXIT_BAD_INPUT
    error = reporter.of_kind("error")[0]
    assert error.code == "invalid_hyperparameters" and "samples.holdout" in (error.message or "")


def test_samples_off(tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path) -> None:
    reporter = ListReporter()
    request = _request(
        tiny_model_dir, demo_files, tmp_path / "run", validation=False, samples={"n_prompts": 0}, max_steps=1
    )
    assert train(request, reporter) == EXIT_OK
    assert not [r for r in reporter.of_kind("event") if r.data and "samples" in r.data]
    assert "samples" not in {r.name for r in reporter.of_kind("artifact")}


@pytest.mark.parametrize(
    "block",
    [
        {"n_prompts": -1},
        {"n_prompts": 65},
        {"max_new_tokens": 0},
        {"temperature": 0},
        {"graders": [{"type": "text_similarity", "evaluation_metric": "meteor"}]},
        {"graders": [{"type": "text_similarity", "evaluation_metric": "rouge_6"}]},
        {"holdout": 65},
        {"holdout": "all"},
        {"graders": [{"type": "string_check", "operation": "contains"}]},
        {"graders": [{"type": "score_model"}]},
        {"graders": [{"type": "string_check", "operation": "eq"}, {"type": "string_check", "operation": "ne"}]},
        {"unknown": 1},
    ],
)
def test_bad_samples_blocks_are_refused(block: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Samples.model_validate(block)
