"""Supervised jobs: real TRL ``SFTTrainer`` runs on the tiny model (CPU), and the assistant-token mask."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from contracts.method import Method
from contracts.sft_formats import SupervisedExample
from worker.training.callbacks import StopFlag
from worker.training.reporter import ListReporter
from worker.training.request import EXIT_OK, EXIT_STOPPED, TrainRequest
from worker.training.run import train

SFT_METRICS = {
    "step", "total_steps", "epoch", "train_loss", "learning_rate", "grad_norm", "tokens_per_second",
    "eta_seconds", "token_accuracy", "trained_tokens",
}  # fmt: skip


@pytest.fixture(scope="session")
def sft_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from worker.training.sft_demo_data import write_sft_demo_data

    return write_sft_demo_data(tmp_path_factory.mktemp("sft"), n_train=96, n_valid=16, seed=0)


def _request(model: Path, data: tuple[Path, Path | None], out: Path, **hp: Any) -> TrainRequest:
    return TrainRequest(
        job_id="job-sft",
        attempt=1,
        model_path=str(model),
        train_file=str(data[0]),
        validation_file=str(data[1]) if data[1] else None,
        output_dir=str(out),
        seed=0,
        device="cpu",
        method=Method.model_validate({"type": "supervised", "supervised": {"hyperparameters": hp}}),
    )


def _tokenizer(model_dir: Path) -> Any:
    from worker.training.loading import load_tokenizer

    return load_tokenizer(str(model_dir))


def test_mask_covers_exactly_the_trained_assistant_turns(tiny_model_dir: Path) -> None:
    from worker.training.sft import tokenize_example

    tok = _tokenizer(tiny_model_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 plus 2?"},
        {"role": "assistant", "content": "The product is 2."},
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": "The sum is 7."},
    ]
    example = SupervisedExample(messages=messages, trained=[False, False, False, False, True], line=1)
    ids, mask = tokenize_example(tok, example)
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]  # what TRL feeds
    trained_text = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    # the last reply and its end-of-turn token, nothing of the context nor the weight-0 reply
    assert trained_text.startswith("The sum is 7.") and tok.eos_token in trained_text
    assert "product" not in trained_text and "plus" not in trained_text and "assistant" not in trained_text
    # the prefix up to the first trained token is exactly the context the model sees at inference
    first = mask.index(1)
    context = tok.apply_chat_template(messages[:4], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids[:first] == context["input_ids"]

    both = SupervisedExample(messages=messages, trained=[False, False, True, False, True], line=1)
    _, mask_both = tokenize_example(tok, both)
    assert sum(mask_both) > sum(mask) and "product" in tok.decode([i for i, m in zip(ids, mask_both, strict=True) if m])


def test_mask_equals_trl_generation_mask_on_a_marked_template(tiny_model_dir: Path) -> None:
    """Where a template has ``{% generation %}`` markers, TRL's own mask (``return_assistant_tokens_mask``)
    and ours agree token for token."""
    from worker.training.sft import tokenize_example

    tok = _tokenizer(tiny_model_dir)
    tok.chat_template = (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
        "{% generation %}{{ message['content'] + eos_token + '\n' }}{% endgeneration %}"
        "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )
    messages = [
        {"role": "user", "content": "What is 1 plus 2?"},
        {"role": "assistant", "content": "The sum is 3."},
        {"role": "user", "content": "And 2 plus 2?"},
        {"role": "assistant", "content": "The sum is 4."},
    ]
    trl = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = tokenize_example(tok, SupervisedExample(messages=messages, trained=[False, True, False, True], line=1))
    assert ids == trl["input_ids"] and mask == trl["assistant_masks"]


def test_template_that_is_not_turn_by_turn_is_refused(tiny_model_dir: Path) -> None:
    from worker.training.data import DataError
    from worker.training.sft import tokenize_example

    tok = _tokenizer(tiny_model_dir)
    # renders the number of messages first: a conversation's prefix renders differently from its start
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match=r"line 7: .*turn by turn"):
        tokenize_example(tok, SupervisedExample(messages=messages, trained=[False, True], line=7))


def test_supervised_run_reports_metrics_checkpoints_and_learns(
    tiny_model_dir: Path, sft_files: tuple[Path, Path], tmp_path: Path
) -> None:
    reporter = ListReporter()
    request = _request(tiny_model_dir, sft_files, tmp_path / "run", max_steps=8, checkpoint_every=4, batch_size=8)
    assert train(request, reporter) == EXIT_OK, reporter.of_kind("error")
    resolved = reporter.reports[0].data or {}
    assert resolved["loss_type"] == "sft" and resolved["lora_r"] == 16 and resolved["lora_alpha"] == 16
    assert resolved["lora_dropout"] == 0.05 and "gate_proj" in resolved["target_modules"]  # the SFT preset

    train_metrics = [r.data for r in reporter.of_kind("metrics") if r.data and "train_loss" in r.data]
    assert [m["step"] for m in train_metrics] == list(range(1, 9))
    for m in train_metrics:
        assert set(m) >= SFT_METRICS, SFT_METRICS - set(m)
        assert "ipo_margin" not in m and 0.0 <= m["token_accuracy"] <= 1.0
    # It learns: on the fixed held-out file (each training step's figures are one batch of 8 and already
    # at 92-97% token accuracy, so step-to-step they are noise: last vs first step differed by chance).
    valid = [r.data for r in reporter.of_kind("metrics") if r.data and "valid_loss" in r.data]
    assert len(valid) >= 2 and "valid_token_accuracy" in valid[-1]
    assert valid[-1]["valid_loss"] < valid[0]["valid_loss"]
    assert valid[-1]["valid_token_accuracy"] >= valid[0]["valid_token_accuracy"]

    assert [c.step for c in reporter.of_kind("checkpoint")] == [4, 8]
    artifacts = {r.name: Path(r.path or "") for r in reporter.of_kind("artifact")}
    adapter = artifacts["adapter"]
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "tokenizer.json").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and "gate_proj" in config["target_modules"]
    assert (reporter.of_kind("done")[0].data or {})["trained_tokens"] > 0


def test_loss_is_on_assistant_tokens_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Changing the context (system/user text) changes the training loss only through the predictions of the
    reply: a run whose prompts are garbage has the same number of loss tokens, and TRL's labels are -100
    exactly outside the mask."""
    from datasets import Dataset
    from trl import SFTTrainer

    from worker.training.sft import load_supervised_data, sft_args

    data = tmp_path / "d.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"What is {a} plus 1?"}, {"role": "assistant", "content": "Yes."}]}
        for a in range(1, 5)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = _tokenizer(tiny_model_dir)
    prepared = load_supervised_data(data, tok, max_length=64)
    from worker.training.loading import load_model
    from worker.training.recipe import TrainingConfig

    cfg = TrainingConfig(device="cpu", quantization="none", max_length=64, max_steps=1, optim="adamw_torch")
    trainer = SFTTrainer(
        model=load_model(str(tiny_model_dir), cfg),
        args=sft_args(cfg, tmp_path / "out", evaluate=False),
        train_dataset=prepared.dataset,
        processing_class=tok,
    )
    assert isinstance(trainer.train_dataset, Dataset)
    row = trainer.train_dataset[0]
    labels = [t for t in row["labels"] if t != -100]
    assert tok.decode(labels).startswith("Yes.") and len(labels) == sum(prepared.dataset[0]["assistant_masks"])


def test_pause_and_resume_matches_uninterrupted(
    tiny_model_dir: Path, sft_files: tuple[Path, Path], tmp_path: Path
) -> None:
    hp = {"max_steps": 6, "batch_size": 4, "checkpoint_every": 100}
    data = (sft_files[0], None)
    full = ListReporter()
    assert train(_request(tiny_model_dir, data, tmp_path / "full", **hp), full) == EXIT_OK
    flag = StopFlag()
    flag.stop_at_step = 3
    first = ListReporter()
    assert train(_request(tiny_model_dir, data, tmp_path / "a1", **hp), first, flag) == EXIT_STOPPED
    (ckpt,) = first.of_kind("checkpoint")
    second = ListReporter()
    request = _request(tiny_model_dir, data, tmp_path / "a2", **hp)
    request.resume_from = ckpt.path
    assert train(request, second) == EXIT_OK

    def losses(reporter: ListReporter) -> dict[int, float]:
        return {
            r.data["step"]: r.data["train_loss"]
            for r in reporter.of_kind("metrics")
            if r.data and "train_loss" in r.data
        }

    resumed = losses(first) | losses(second)
    assert sorted(resumed) == list(range(1, 7))
    for step, loss in losses(full).items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4, abs=1e-6), step
    expected = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "a2" / "adapter" / "adapter_model.safetensors"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


def test_preference_file_and_preference_hyperparameters_are_refused(
    tiny_model_dir: Path, demo_files: tuple[Path, Path], sft_files: tuple[Path, Path], tmp_path: Path
) -> None:
    reporter = ListReporter()
    assert train(_request(tiny_model_dir, (demo_files[0], None), tmp_path / "a"), reporter) not in (
        EXIT_OK,
        EXIT_STOPPED,
    )
    (error,) = reporter.of_kind("error")
    assert (
        error.code == "invalid_training_file" and "line 1" in (error.message or "") and "ipo" in (error.message or "")
    )

    reporter = ListReporter()
    assert train(_request(tiny_model_dir, (sft_files[0], None), tmp_path / "b", beta=0.1), reporter) not in (
        EXIT_OK,
        EXIT_STOPPED,
    )
    (error,) = reporter.of_kind("error")
    assert error.code == "invalid_hyperparameters" and "hyperparameters.beta" in (error.message or "")


def test_supervised_auto_values_are_the_zephyr_sft_recipe() -> None:
    """A 7B-sized Mistral on CUDA: every "auto" is the handbook's SFT QLoRA value (recipe.ZEPHYR_SFT)."""
    from worker.training.recipe import resolve_config

    mistral = {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "max_position_embeddings": 32768}
    cfg = resolve_config(
        Method.model_validate({"type": "supervised"}), n_train_examples=1000, model_config_dict=mistral, device="cuda"
    )
    assert (cfg.loss_type, cfg.learning_rate, cfg.n_epochs, cfg.batch_size) == ("sft", 2.0e-4, 1, 4)
    assert (cfg.gradient_accumulation_steps, cfg.max_length, cfg.warmup_ratio, cfg.lr_scheduler) == (
        2,
        2048,
        0.1,
        "cosine",
    )
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.quantization) == (16, 16.0, 0.05, "nf4")
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg.precompute_ref_log_probs is False and cfg.sft_weight == 0.0
    assert cfg.total_steps == 125  # ceil(1000 / (4 * 2)) steps of one epoch
