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


# --- base models without a chat template (issue 12, section 2) ------------------------------------------------


def test_a_base_model_without_a_template_trains_with_zephyr_and_ships_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    from contracts.chat_templates import NAMED_TEMPLATES

    model = copy_with_template(tiny_model_dir, tmp_path / "base", None)
    assert AutoTokenizer.from_pretrained(model).chat_template is None  # a base model, like Mistral-7B-v0.1
    data = write_rows(tmp_path / "train.jsonl", CONVERSATIONAL, repeat=4)
    reporter = ListReporter()
    assert train(request_for(model, data, tmp_path / "run", max_steps=1, batch_size=2), reporter) == EXIT_OK
    assert (reporter.of_kind("resolved")[0].data or {})["chat_template"] == "zephyr"
    said = [r.message or "" for r in reporter.of_kind("event")]
    assert any("has no chat template (a base model)" in m and "zephyr" in m for m in said), said
    adapter = AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter")
    assert adapter.chat_template == NAMED_TEMPLATES["zephyr"]  # whoever loads the adapter formats alike


def test_a_named_template_replaces_the_models_own(tiny_model_dir: Path, tmp_path: Path) -> None:
    from contracts.chat_templates import NAMED_TEMPLATES

    data = write_rows(tmp_path / "train.jsonl", CONVERSATIONAL, repeat=4)
    request = request_for(tiny_model_dir, data, tmp_path / "run", max_steps=1, batch_size=2)
    request.method = Method.model_validate(
        {"type": "ipo", "ipo": {"hyperparameters": {"max_steps": 1, "batch_size": 2}, "chat_template": "chatml"}}
    )
    reporter = ListReporter()
    assert train(request, reporter) == EXIT_OK
    assert (reporter.of_kind("resolved")[0].data or {})["chat_template"] == "chatml"
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter").chat_template == NAMED_TEMPLATES["chatml"]


@pytest.mark.parametrize("name", ["zephyr", "chatml", "llama-3", "mistral-instruct"])
def test_named_templates_count_alike_in_the_api_and_the_worker(tiny_model_dir: Path, tmp_path: Path, name: str) -> None:
    from contracts.chat_templates import NAMED_TEMPLATES

    rows = CONVERSATIONAL[:1] if name == "mistral-instruct" else CONVERSATIONAL  # it refuses system turns
    examples, _ = parse_preference_file(write_rows(tmp_path / "d.jsonl", rows))
    worker = AutoTokenizer.from_pretrained(tiny_model_dir)
    worker.chat_template = NAMED_TEMPLATES[name]
    api = PromptTokenizer(tiny_model_dir, NAMED_TEMPLATES[name])
    assert api.pairs(examples) == [pair_tokens(worker, ex) for ex in examples]


# --- pairs identical after truncation (issue 12, section 3.2): the field case's rows ---------------------------

STEPS = (
    "Here is a careful, step by step answer. First, we read the question. Second, we list what we know. "
    "Third, we check each fact. Finally, the answer is: "
)
IDENTICAL_AFTER_TRUNCATION = [
    {"prompt": "What is the capital of France?", "chosen": STEPS + "Paris.", "rejected": STEPS + "Lyon."},
    {"prompt": "What is 3 times 4?", "chosen": STEPS + "12.", "rejected": STEPS + "7."},
    {"prompt": "Is ice cold?", "chosen": "Yes.", "rejected": "No."},
]


def test_pairs_identical_after_truncation_are_left_out_and_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    from worker.training.data import describe_skipped

    data = write_rows(tmp_path / "d.jsonl", IDENTICAL_AFTER_TRUNCATION)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepared = load_preference_data(data, tokenizer, max_length=64)
    assert prepared.identical_lines == [1, 2] and prepared.n_examples == 1
    assert prepared.dataset[0]["chosen"] == [{"role": "assistant", "content": "Yes."}]
    said = describe_skipped(prepared, 64) or ""
    assert "2 pairs left out: chosen and rejected are the same tokens once cut at max_length=64" in said
    assert "(lines 1, 2)" in said
    assert load_preference_data(data, tokenizer, max_length=256).identical_lines == []  # room for the answers

    api = PromptTokenizer(tiny_model_dir)  # the API names the same lines at job creation
    from app.services.prompt_lengths import identical_after_truncation, measure_file

    measured = measure_file(data, api)
    assert measured is not None and identical_after_truncation(measured, 64) == [1, 2]

    with pytest.raises(DataError, match="no pair is left to train on"):
        load_preference_data(write_rows(tmp_path / "e.jsonl", IDENTICAL_AFTER_TRUNCATION[:2]), tokenizer, max_length=64)
