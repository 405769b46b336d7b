"""The worker on real-world data faults, with the real tiny model and TRL: a refusing chat template fails
the job as ``invalid_training_file`` naming the line (not ``internal_error``), text rows with chat markup
train verbatim (and the job says so), and the API's token counts agree with TRL's for every kind of row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from app.services.prompt_lengths import PromptTokenizer
from contracts.data_formats import parse_preference_file
from contracts.method import Method
from tests.api.test_data_faults_api import REFUSING_TEMPLATE
from tests.unit.test_data_faults import AXOLOTL_SYSTEM, HH_SPLIT
from worker.training.data import DataError, load_preference_data, pair_tokens
from worker.training.reporter import ListReporter
from worker.training.request import EXIT_OK, TrainRequest
from worker.training.run import EXIT_BAD_INPUT, train

CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "6"}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Answer with one number."},
            {"role": "user", "content": "What is 4 + 4?"},
        ],
        "chosen": [{"role": "assistant", "content": "8"}],
        "rejected": [{"role": "assistant", "content": "9"}],
    },
]


def write_rows(path: Path, rows: list[dict[str, Any]], repeat: int = 1) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * repeat), encoding="utf-8")
    return path


def copy_with_template(model_dir: Path, target: Path, template: str | None) -> Path:
    """A copy of the model whose chat template is ``template`` (None: removed)."""
    shutil.copytree(model_dir, target, symlinks=False)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return target


def request_for(model: Path, data: Path, out: Path, **hp: Any) -> TrainRequest:
    return TrainRequest(
        job_id="job-test",
        attempt=1,
        model_path=str(model),
        train_file=str(data),
        output_dir=str(out),
        seed=0,
        device="cpu",
        method=Method.model_validate({"type": "ipo", "ipo": {"hyperparameters": hp}}),
    )


def test_a_template_refusal_fails_the_job_naming_the_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = copy_with_template(tiny_model_dir, tmp_path / "gemma-like", REFUSING_TEMPLATE)
    data = write_rows(tmp_path / "train.jsonl", CONVERSATIONAL)
    reporter = ListReporter()
    assert train(request_for(model, data, tmp_path / "run", max_steps=1), reporter) == EXIT_BAD_INPUT
    (error,) = reporter.of_kind("error")
    assert error.code == "invalid_training_file", error.message
    assert '"System role not supported" (line 2)' in (error.message or "")


def test_hh_transcripts_train_verbatim_and_the_job_says_so(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_rows(tmp_path / "hh.jsonl", HH_SPLIT, repeat=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepared = load_preference_data(data, tokenizer, max_length=256)
    assert prepared.text_mode == "verbatim"
    assert prepared.dataset[1] == {k: HH_SPLIT[1][k] for k in ("prompt", "chosen", "rejected")}  # strings, as given

    reporter = ListReporter()
    assert train(request_for(tiny_model_dir, data, tmp_path / "run", max_steps=1, batch_size=2), reporter) == EXIT_OK
    resolved = reporter.of_kind("resolved")[0].data or {}
    assert resolved["text_rows"] == "verbatim"
    said = [r.message or "" for r in reporter.of_kind("event") if "text rows" in (r.message or "")]
    assert said and "used verbatim" in said[0] and "Anthropic HH" in said[0]


def test_plain_text_rows_are_templated_and_recorded(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_rows(tmp_path / "axolotl.jsonl", AXOLOTL_SYSTEM)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepared = load_preference_data(data, tokenizer, max_length=256)
    assert prepared.text_mode == "chat_template"
    assert prepared.dataset[0]["prompt"][0] == {"role": "system", "content": AXOLOTL_SYSTEM[0]["system"]}


@pytest.mark.parametrize("rows", [HH_SPLIT, AXOLOTL_SYSTEM, CONVERSATIONAL], ids=["verbatim", "system", "chat"])
def test_api_token_counts_agree_with_the_worker(tiny_model_dir: Path, tmp_path: Path, rows: list[Any]) -> None:
    data = write_rows(tmp_path / "d.jsonl", rows)
    api = PromptTokenizer(tiny_model_dir)
    examples, report = parse_preference_file(data, special_tokens=api.special_tokens)
    assert report.ok
    worker = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert api.pairs(examples) == [pair_tokens(worker, ex) for ex in examples]


def test_the_worker_refuses_what_the_template_raises_on_like_the_api(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = copy_with_template(tiny_model_dir, tmp_path / "alternating", REFUSING_TEMPLATE)
    rows = [
        CONVERSATIONAL[0],
        {**CONVERSATIONAL[0], "prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    ]
    data = write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"Conversation roles must alternate.*\(line 2\)"):
        load_preference_data(data, AutoTokenizer.from_pretrained(model), max_length=256)
    examples, _ = parse_preference_file(data)
    api = PromptTokenizer(model).pairs(examples)
    assert isinstance(api[1], str) and "Conversation roles must alternate" in api[1]
