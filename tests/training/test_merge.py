"""``ipo adapters merge``: base + LoRA adapter -> a standalone model with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def test_merge_gives_same_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from ipo_cli.main import app

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)  # lora_B starts at zero: make the adapter change the model
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(adapter_dir))

    out = tmp_path / "merged"
    result = CliRunner().invoke(
        app, ["adapters", "merge", "--base", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), str(adapter_dir)
    ).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        before = plain(input_ids=ids).logits
    assert (want - before).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template


def test_merge_rejects_non_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    from worker.training.merge import MergeError, merge_adapter

    with pytest.raises(MergeError):
        merge_adapter(tiny_model_dir, tmp_path, tmp_path / "out")


def test_merge_of_a_chain_applies_the_parents_first(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A job that started from a fine-tuned model: base + parent adapter(s) + its own, in that order."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from worker.training.merge import merge_adapter

    def random_adapter(seed: int, path: Path, start: Path | None = None) -> Path:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        if start is not None:
            model = PeftModel.from_pretrained(model, str(start)).merge_and_unload()
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2)
        peft_model.save_pretrained(str(path))
        return path

    parent = random_adapter(1, tmp_path / "parent")
    child = random_adapter(2, tmp_path / "child", start=parent)
    out = merge_adapter(tiny_model_dir, child, tmp_path / "merged", parents=[parent])
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    start = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(parent))
    reference = PeftModel.from_pretrained(start.merge_and_unload(), str(child)).eval()
    alone = merge_adapter(tiny_model_dir, child, tmp_path / "alone")
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(out)).eval()(input_ids=ids).logits
        without_parent = AutoModelForCausalLM.from_pretrained(str(alone)).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (without_parent - want).abs().max() > 1e-3  # the parent matters
