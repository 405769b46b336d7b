"""A job on a fine-tuned model, on the tiny model (CPU): the parent adapter is merged in before the new one
is trained, and the IPO reference the trainer uses is that merged starting model, not the raw base."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from contracts.method import Method
from worker.training.reporter import ListReporter
from worker.training.request import EXIT_OK, TrainRequest
from worker.training.run import train


def _sft_adapter(model: Path, out: Path) -> Path:
    from worker.training.sft_demo_data import write_sft_demo_data

    train_file, _ = write_sft_demo_data(out / "data", n_train=48, n_valid=8, seed=0)
    request = TrainRequest(
        job_id="job-parent",
        attempt=1,
        model_path=str(model),
        train_file=str(train_file),
        output_dir=str(out / "sft"),
        seed=0,
        device="cpu",
        method=Method.model_validate(
            {"type": "supervised", "supervised": {"hyperparameters": {"max_steps": 6, "batch_size": 8}}}
        ),
    )
    reporter = ListReporter()
    assert train(request, reporter) == EXIT_OK, reporter.of_kind("error")
    return out / "sft" / "adapter"


def _completion_logps(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> float:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt) - 1 :].sum())


def test_reference_log_probs_are_those_of_the_merged_starting_model(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _sft_adapter(tiny_model_dir, tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(demo_files[0].read_text().splitlines(keepends=True)[:16]))
    request = TrainRequest(
        job_id="job-child",
        attempt=1,
        model_path=str(tiny_model_dir),
        train_file=str(pairs),
        output_dir=str(tmp_path / "ipo"),
        seed=0,
        device="cpu",
        parent_adapters=[str(adapter)],
        cache_dir=str(tmp_path / "cache"),
        method=Method.model_validate(
            {"type": "ipo", "ipo": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}, "samples": {"n_prompts": 0}}}
        ),
    )
    reporter = ListReporter()
    assert train(request, reporter) == EXIT_OK, reporter.of_kind("error")
    assert (reporter.reports[0].data or {})["precompute_ref_log_probs"] is True
    (entry,) = (tmp_path / "cache" / "prepared").glob("*.parquet")
    rows = pq.read_table(entry).to_pylist()
    assert len(rows) == 16

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)
    ).merge_and_unload()
    merged.eval()
    gaps = []
    for row in rows:
        for side in ("chosen", "rejected"):
            want = _completion_logps(merged, row["prompt_ids"], row[f"{side}_ids"])
            assert row[f"ref_{side}_logps"] == pytest.approx(want, abs=1e-3), side
            gaps.append(abs(want - _completion_logps(base, row["prompt_ids"], row[f"{side}_ids"])))
    assert max(gaps) > 20 * 1e-3  # the parent adapter changed the model: the base would fail the check above

    # the new adapter is the child's own: a fresh LoRA, not the parent's weights carried over
    config = json.loads((tmp_path / "ipo" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["target_modules"]


def test_warm_start_begins_from_the_checkpoint_weights_with_a_fresh_optimiser(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from worker.training.sft_demo_data import write_sft_demo_data

    train_file, _ = write_sft_demo_data(tmp_path / "data", n_train=32, n_valid=8, seed=0)

    def request(out: str, **hp: object) -> TrainRequest:
        return TrainRequest(
            job_id=out,
            attempt=1,
            model_path=str(tiny_model_dir),
            train_file=str(train_file),
            output_dir=str(tmp_path / out),
            seed=0,
            device="cpu",
            method=Method.model_validate({"type": "supervised", "supervised": {"hyperparameters": hp}}),
        )

    first = ListReporter()
    assert train(request("a", max_steps=2, checkpoint_every=2, batch_size=8), first) == EXIT_OK
    (ckpt,) = first.of_kind("checkpoint")
    warm = request("b", max_steps=1, batch_size=8, learning_rate=1e-12, warmup_ratio=0.0)
    warm.init_adapter = ckpt.path
    second = ListReporter()
    assert train(warm, second) == EXIT_OK, second.of_kind("error")
    assert any("warm start" in (r.message or "") and "fresh" in (r.message or "") for r in second.of_kind("event"))
    steps = [r.data["step"] for r in second.of_kind("metrics") if r.data and "train_loss" in r.data]
    assert steps == [1]  # a new run (its own step count and schedule), not a resume at step 3
    start = load_file(str(Path(ckpt.path or "") / "adapter_model.safetensors"))
    end = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert start.keys() == end.keys()
    assert any(t.abs().sum() > 0 for n, t in start.items() if "lora_B" in n)  # trained, not a fresh LoRA
    for name in start:  # a step of lr 1e-12 leaves the weights where the checkpoint had them
        torch.testing.assert_close(end[name], start[name], rtol=0, atol=1e-6)
