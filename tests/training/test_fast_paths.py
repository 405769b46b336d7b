"""The speed work changes nothing that is learned: precomputed reference log-probs equal the per-step
ones, a cached run equals a fresh one, and length-grouped batches resume exactly, across epochs too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

import worker.training.recipe as recipe
from contracts.method import Method
from worker.training.callbacks import StopFlag
from worker.training.reporter import ListReporter
from worker.training.request import EXIT_OK, EXIT_STOPPED, TrainRequest
from worker.training.run import train


def _request(model: Path, train_file: Path, out: Path, cache: Path | None = None, **hp: Any) -> TrainRequest:
    return TrainRequest(
        job_id="job-fast",
        attempt=1,
        model_path=str(model),
        train_file=str(train_file),
        output_dir=str(out),
        seed=0,
        device="cpu",
        cache_dir=str(cache) if cache else None,
        # no samples (so no prompts held out of training): these tests compare training paths on all 16 pairs
        method=Method.model_validate(
            {"type": "ipo", "ipo": {"hyperparameters": {"beta": 0.5, **hp}, "samples": {"n_prompts": 0}}}
        ),
    )


def _train_metric(reporter: ListReporter, name: str) -> dict[int, float]:
    return {r.data["step"]: r.data[name] for r in reporter.of_kind("metrics") if r.data and "train_loss" in r.data}


def _losses(reporter: ListReporter) -> dict[int, float]:
    return _train_metric(reporter, "train_loss")


def _margins(reporter: ListReporter) -> dict[int, float]:
    return _train_metric(reporter, "ipo_margin")


def _assert_same_run(a: ListReporter, b: ListReporter, out_a: Path, out_b: Path, rel: float = 1e-4) -> None:
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb)
    for step, loss in la.items():
        assert lb[step] == pytest.approx(loss, rel=rel, abs=1e-6), step
    wa, wb = load_file(str(out_a / "adapter_model.safetensors")), load_file(str(out_b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)


def _events(reporter: ListReporter) -> list[str]:
    return [r.message or "" for r in reporter.of_kind("event")]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.training.demo_data import write_demo_data

    train_file, _ = write_demo_data(tmp_path_factory.mktemp("small"), n_train=16, n_valid=8, seed=1)
    return train_file


def test_precomputed_reference_trains_exactly_like_the_per_step_one(
    tiny_model_dir: Path, small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolve = recipe.resolve_config
    runs: dict[bool, ListReporter] = {}
    for precompute in (False, True):
        monkeypatch.setattr(
            recipe,
            "resolve_config",
            lambda *a, _p=precompute, **k: resolve(*a, **k).model_copy(update={"precompute_ref_log_probs": _p}),
        )
        runs[precompute] = ListReporter()
        request = _request(tiny_model_dir, small_data, tmp_path / str(precompute), max_steps=4, batch_size=4)
        assert train(request, runs[precompute]) == EXIT_OK
    assert not any(e.startswith("reference log-probs") for e in _events(runs[False]))
    assert any(e.startswith("reference log-probs of 16 pairs computed") for e in _events(runs[True]))
    _assert_same_run(runs[False], runs[True], tmp_path / "False" / "adapter", tmp_path / "True" / "adapter")
    for step, margin in _margins(runs[False]).items():  # the per-token IPO margin comes out the same way too
        assert _margins(runs[True])[step] == pytest.approx(margin, rel=1e-4, abs=1e-5)


def test_precomputed_reference_is_the_base_model(tiny_model_dir: Path, small_data: Path, tmp_path: Path) -> None:
    """With PEFT and no ref_model, the reference is the adapter disabled: the plain base model's log-probs."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from worker.training.trainer import REF_COLUMNS, IpoDPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in small_data.read_text().splitlines()]
    args = DPOConfig(
        output_dir=str(tmp_path), loss_type=["ipo"], precompute_ref_log_probs=True, use_cpu=True, bf16=False,
        per_device_train_batch_size=4, max_length=64, report_to="none", gradient_checkpointing=False,
    )  # fmt: skip
    trainer = IpoDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():  # LoRA B starts at zero, so give the adapter weight: disabling it must matter
        assert trainer.model is not None
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    assert isinstance(trainer.train_dataset, Dataset)
    unscored = trainer.train_dataset.remove_columns(list(REF_COLUMNS))
    prepared = trainer._precompute_ref_logps(unscored, "train", 3)  # longest-first batches of 3, the last short
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for row in prepared:
        for reply, column in (("chosen_ids", "ref_chosen_logps"), ("rejected_ids", "ref_rejected_logps")):
            ids = torch.tensor([row["prompt_ids"] + row[reply]])
            with torch.no_grad():
                logps = torch.log_softmax(base(input_ids=ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            per_token = logps.gather(1, targets[:, None])[:, 0][len(row["prompt_ids"]) - 1 :]
            assert row[column] == pytest.approx(float(per_token.sum()), abs=1e-3)


def test_a_second_run_on_the_same_file_uses_the_cache_and_learns_the_same(
    tiny_model_dir: Path, small_data: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first, second = ListReporter(), ListReporter()
    hp = {"max_steps": 4, "batch_size": 4}
    assert train(_request(tiny_model_dir, small_data, tmp_path / "a", cache, **hp), first) == EXIT_OK
    assert any(e.startswith("reference log-probs of 16 pairs computed") for e in _events(first))
    assert len(list((cache / "prepared").glob("*.parquet"))) == 1
    assert train(_request(tiny_model_dir, small_data, tmp_path / "b", cache, **hp), second) == EXIT_OK
    assert "tokenized pairs and reference log-probs (train) loaded from the cache" in _events(second)
    assert not any(e.startswith("reference log-probs") for e in _events(second))
    _assert_same_run(first, second, tmp_path / "a" / "adapter", tmp_path / "b" / "adapter", rel=1e-5)

    (entry,) = (cache / "prepared").glob("*.parquet")
    entry.write_bytes(entry.read_bytes()[:100])  # a torn write: ignored and rebuilt
    third = ListReporter()
    assert train(_request(tiny_model_dir, small_data, tmp_path / "c", cache, **hp), third) == EXIT_OK
    assert any(e.startswith("reference log-probs of 16 pairs computed") for e in _events(third))
    _assert_same_run(first, third, tmp_path / "a" / "adapter", tmp_path / "c" / "adapter", rel=1e-5)
    assert (cache / "prepared" / entry.name).stat().st_size > 100


def test_length_grouped_run_resumes_exactly_across_epochs(
    tiny_model_dir: Path, small_data: Path, tmp_path: Path
) -> None:
    hp: dict[str, Any] = {"batch_size": 4, "n_epochs": 3, "checkpoint_every": 100}  # 4 steps an epoch, 12 in all
    full = ListReporter()
    assert train(_request(tiny_model_dir, small_data, tmp_path / "full", **hp), full) == EXIT_OK
    resolved = full.reports[0].data or {}
    assert resolved["group_by_length"] is True and resolved["precompute_ref_log_probs"] is True
    assert resolved["total_steps"] == 12

    flag = StopFlag()
    flag.stop_at_step = 6  # mid-way through the second epoch
    first = ListReporter()
    assert train(_request(tiny_model_dir, small_data, tmp_path / "a1", **hp), first, flag) == EXIT_STOPPED
    (ckpt,) = first.of_kind("checkpoint")
    second = ListReporter()
    request = _request(tiny_model_dir, small_data, tmp_path / "a2", **hp)
    request.resume_from = ckpt.path
    assert train(request, second) == EXIT_OK

    resumed = ListReporter()
    resumed.reports = first.reports + second.reports
    _assert_same_run(full, resumed, tmp_path / "full" / "adapter", tmp_path / "a2" / "adapter")
