"""Base-model templates and data faults on a real tokenizer: SmolLM2-135M-Instruct (``ipo models fetch``)
copied with its chat template removed, as a base model ships (slow: the real model, a CPU training step).

The API's torch-free counts agree with TRL's on the real byte-level BPE tokenizer for every named
template and for text rows used verbatim, the real special tokens mark text rows as formatted, and a job
on the template-less copy trains with Zephyr's template, which the adapter's tokenizer carries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from app.services.prompt_lengths import PromptTokenizer
from contracts.chat_templates import NAMED_TEMPLATES, model_chat_template, special_tokens
from contracts.data_formats import parse_preference_file
from contracts.method import Method
from tests.training.test_data_faults_worker import CONVERSATIONAL, write_rows
from tests.unit.test_data_faults import HH_SPLIT
from worker.training.data import pair_tokens
from worker.training.reporter import ListReporter
from worker.training.request import EXIT_OK, TrainRequest
from worker.training.run import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_base(smollm2_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real model's directory without its chat template; the weights are linked, not copied."""
    source = smollm2_models_dir / "smollm2-135m-instruct"
    base = tmp_path_factory.mktemp("models") / "smollm2-base"
    base.mkdir()
    for item in source.iterdir():
        if item.name == "model.safetensors":
            (base / item.name).symlink_to(item.resolve())
        elif item.name != "chat_template.jinja":
            shutil.copy(item, base / item.name)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    assert model_chat_template(base) is None and AutoTokenizer.from_pretrained(base).chat_template is None
    return base


@pytest.mark.parametrize("name", list(NAMED_TEMPLATES))
def test_named_templates_count_alike_on_a_real_tokenizer(smollm2_base: Path, tmp_path: Path, name: str) -> None:
    rows = CONVERSATIONAL[:1] if name == "mistral-instruct" else CONVERSATIONAL  # it refuses system turns
    examples, report = parse_preference_file(write_rows(tmp_path / "d.jsonl", rows))
    assert report.ok
    worker = AutoTokenizer.from_pretrained(smollm2_base)
    worker.chat_template = NAMED_TEMPLATES[name]
    api = PromptTokenizer(smollm2_base, NAMED_TEMPLATES[name])
    assert api.pairs(examples) == [pair_tokens(worker, ex) for ex in examples]


def test_verbatim_rows_count_alike_and_real_special_tokens_mark_text(smollm2_base: Path, tmp_path: Path) -> None:
    assert "<|im_start|>" in special_tokens(smollm2_base)
    chatml_text = {
        "prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "chosen": "Hello",
        "rejected": "Go",
    }
    for rows in (HH_SPLIT, [chatml_text]):
        path = write_rows(tmp_path / "d.jsonl", rows)
        api = PromptTokenizer(smollm2_base, NAMED_TEMPLATES["zephyr"])
        examples, report = parse_preference_file(path, special_tokens=api.special_tokens)
        assert report.ok and report.text_mode == "verbatim"
        worker = AutoTokenizer.from_pretrained(smollm2_base)
        assert api.pairs(examples) == [pair_tokens(worker, ex) for ex in examples]


def test_a_real_base_tokenizer_without_a_template_trains_with_zephyr(smollm2_base: Path, tmp_path: Path) -> None:
    data = write_rows(tmp_path / "train.jsonl", CONVERSATIONAL, repeat=2)
    hp: dict[str, Any] = {"max_steps": 1, "batch_size": 2, "max_length": 64}
    request = TrainRequest(
        job_id="job-real-base",
        attempt=1,
        model_path=str(smollm2_base),
        train_file=str(data),
        output_dir=str(tmp_path / "run"),
        seed=0,
        device="cpu",
        method=Method.model_validate({"type": "ipo", "ipo": {"hyperparameters": hp}}),
    )
    reporter = ListReporter()
    assert train(request, reporter) == EXIT_OK, reporter.of_kind("error")
    assert (reporter.of_kind("resolved")[0].data or {})["chat_template"] == "zephyr"
    assert any("has no chat template (a base model)" in (r.message or "") for r in reporter.of_kind("event"))
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter").chat_template == NAMED_TEMPLATES["zephyr"]
