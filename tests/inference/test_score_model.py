"""The score_model grader against this service itself: a real training run on the tiny model whose samples
are graded through the live API's ``POST /v1/chat/completions`` (forwarded to the live inference server on
the tiny model), configured as a worker would be (``IPO_GRADER_BASE_URL`` + ``IPO_GRADER_API_KEY``); and
the same run with the endpoint down, which only warns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from contracts.graders import ScoreModelGrader
from contracts.method import Method
from ipo_cli.processes import free_port
from tests.inference.conftest import LiveApi
from worker.training.demo_data import write_demo_data
from worker.training.graders import GraderEndpoint, _client, score_model
from worker.training.reporter import ListReporter
from worker.training.request import EXIT_OK, TrainRequest
from worker.training.run import train

GRADER: dict[str, Any] = {
    "type": "score_model",
    "name": "judge",
    "model": "tiny-mistral",
    "input": [
        {"role": "system", "content": "Rate the reply from 0 to 10. Answer with the number only."},
        {"role": "user", "content": "Question: {{item.prompt}}\nReply: {{sample.output_text}}"},
    ],
    "range": [0, 10],
    "sampling_params": {"temperature": 0, "seed": 1, "max_completions_tokens": 6},
}


def _run(model: Path, root: Path, grader: dict[str, Any]) -> ListReporter:
    train_file, valid_file = write_demo_data(root / "data", seed=0)
    samples = {"n_prompts": 2, "max_new_tokens": 4, "graders": [grader]}
    request = TrainRequest(
        job_id="job-judged",
        attempt=1,
        model_path=str(model),
        train_file=str(train_file),
        validation_file=str(valid_file),
        output_dir=str(root / "run"),
        seed=0,
        device="cpu",
        method=Method.model_validate(
            {"type": "ipo", "ipo": {"hyperparameters": {"max_steps": 2, "batch_size": 4}, "samples": samples}}
        ),
    )
    reporter = ListReporter()
    assert train(request, reporter) == EXIT_OK
    return reporter


def test_score_model_grades_through_this_services_chat_completions(
    live_api: LiveApi, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = live_api.new_key("grader")
    grader = ScoreModelGrader.model_validate(GRADER)
    # one request by hand: the service answers it (no EndpointError), and its reply is parsed or explained
    direct = score_model(_client(GraderEndpoint(f"{live_api.url}/v1", key, 120)), grader, {
        "sample.output_text": "The sum is 12.", "item.prompt": "Please compute 6 plus 6.",
        "item.chosen": "The sum is 12.", "item.rejected": "The product is 36.",
    })  # fmt: skip
    assert (direct.value is not None and 0 <= direct.value <= 10) or "no score in the grader's reply" in str(
        direct.reason
    )

    monkeypatch.setenv("IPO_GRADER_BASE_URL", f"{live_api.url}/v1")
    monkeypatch.setenv("IPO_GRADER_API_KEY", key)
    monkeypatch.setenv("IPO_GRADER_TIMEOUT_SECONDS", "120")
    reporter = _run(tiny_model_dir, tmp_path, GRADER)
    assert not [r for r in reporter.of_kind("event") if r.level == "warn" and "grader" in (r.message or "")]
    events = [r.data for r in reporter.of_kind("event") if r.data and "samples" in r.data]
    assert [e["step"] for e in events] == [1, 2]
    for event in events:
        for s in event["samples"]:
            assert set(s["scores"]) == {"judge", "judge_reference"}
            for name, value in s["scores"].items():
                # the tiny model's reply is a number (clamped into the range) or text, whose reason quotes it
                reason = s.get("score_reasons", {}).get(name, "")
                assert (value is not None and 0 <= value <= 10) or reason.startswith("no score in the grader's reply")
    metrics = [r.data for r in reporter.of_kind("metrics") if r.data and "samples/judge" in r.data]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["samples/judge"] is None or 0 <= m["samples/judge"] <= 10
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert all("judge" in row["scores"] for row in rows)


def test_score_model_endpoint_down_warns_and_training_goes_on(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IPO_GRADER_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")
    monkeypatch.setenv("IPO_GRADER_TIMEOUT_SECONDS", "5")
    reporter = _run(tiny_model_dir, tmp_path, GRADER)
    warnings = [r.message or "" for r in reporter.of_kind("event") if r.level == "warn"]
    assert any("grader judge: the grader endpoint is unavailable" in w for w in warnings)
    metrics = [r.data for r in reporter.of_kind("metrics") if r.data and "samples/judge" in r.data]
    assert metrics and all(m["samples/judge"] is None for m in metrics)
    assert "adapter" in {r.name for r in reporter.of_kind("artifact")}
