"""The API's torch-free readings of a model agree with transformers on the real tiny model:
prompt token counts (app/services/prompt_lengths.py) and LoRA-targetable modules (contracts/model_info.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.services.prompt_lengths import PromptTokenizer
from contracts.data_formats import parse_preference_file
from contracts.model_info import unknown_target_modules
from worker.training.data import chat_token_ids


def test_prompt_token_counts_match_the_worker(tiny_model_dir: Path, demo_files: tuple[Path, Path]) -> None:
    examples, report = parse_preference_file(demo_files[0])
    assert report.ok
    prompts = [ex.prompt for ex in examples[:100]]
    prompts.append(
        [
            {"role": "system", "content": "Answer with one number."},
            {"role": "user", "content": "What is 3 + 4?"},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "And 3 * 4? Ünïcode too."},
        ]
    )
    worker_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = [len(chat_token_ids(worker_tokenizer, p, generation_prompt=True)) for p in prompts]
    assert PromptTokenizer(tiny_model_dir).count(prompts) == expected


def test_target_module_choices_are_the_models_linear_layers(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {
        "lm_head"
    }
    unknown, choices = unknown_target_modules(tiny_model_dir, sorted(linear))
    assert unknown == [] and set(choices) == linear
    assert unknown_target_modules(tiny_model_dir, ["c_attn"])[0] == ["c_attn"]
