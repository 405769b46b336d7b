"""Job creation refuses settings the chosen model cannot train with (400 naming the field), before any
worker sees the job: LoRA targets the model lacks, max_length over its positions or below a prompt.

The model directory here is real on disk in the parts the API reads: a safetensors file (header and
zero-filled data, written by hand in the format's layout), a ``tokenizers`` tokenizer.json and a
tokenizer_config.json with a Zephyr-style chat template. tests/training/test_prompt_lengths.py checks
the same counting against transformers on the real tiny model.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers

from app.services.prompt_lengths import PromptTokenizer, longest_prompt, measure_file
from contracts.model_info import unknown_target_modules

TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def write_model(model_dir: Path, *, positions: int = 128) -> None:
    """A character-level tokenizer (one token per character, plus the specials) and a 1-layer model."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "mistral", "max_position_embeddings": positions}))
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [8, 4], "lm_head.weight": [8, 4]}
    shapes |= {f"model.layers.0.self_attn.{n}.weight": [4, 4] for n in LAYERS[:4]}
    shapes |= {f"model.layers.0.mlp.{n}.weight": [4, 4] for n in LAYERS[4:]}
    shapes["model.layers.0.input_layernorm.weight"] = [4]
    write_safetensors(model_dir / "model.safetensors", shapes)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in "\nabcdefghijklmnopqrstuvwxyz0123456789 +=?|<>":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.add_special_tokens(["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"])
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": TEMPLATE})
    )


def prompt_tokens(text: str) -> int:
    """Tokens of one user turn rendered with TEMPLATE + generation prompt under the tokenizer above."""
    # <s> <|user|> \n text... </s> \n <|assistant|> \n
    return 1 + 1 + 1 + len(text) + 1 + 1 + 1 + 1


def line(prompt: str) -> bytes:
    return json.dumps({"prompt": prompt, "chosen": "yes", "rejected": "no"}).encode() + b"\n"


@pytest.fixture
def model_dir(settings) -> Path:
    path = settings.resolved_models_dir / "char-model"
    write_model(path)
    return path


def _create(client: TestClient, auth: dict[str, str], file_id: str, *, lora=None, hp=None):
    params = {"lora": lora or {}, "hyperparameters": hp or {}}
    body = {"model": "char-model", "training_file": file_id, "method": {"type": "ipo", "ipo": params}}
    return client.post("/v1/fine_tuning/jobs", headers=auth, json=body)


def test_prompt_tokens_are_counted_with_the_chat_template(model_dir: Path, tmp_path: Path) -> None:
    tokenizer = PromptTokenizer(model_dir)
    assert tokenizer.render([{"role": "user", "content": "hi"}]) == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    data = tmp_path / "d.jsonl"
    data.write_bytes(line("ab") + line("a" * 40) + line("abc"))
    measured = measure_file(data, tokenizer)
    assert measured is not None
    found = longest_prompt(measured, limit=prompt_tokens("a" * 40))
    assert found is not None
    assert (found.tokens, found.line, found.over, found.n_over) == (prompt_tokens("a" * 40), 2, (2,), 1)


def test_target_modules_come_from_the_weights(model_dir: Path) -> None:
    assert unknown_target_modules(model_dir, ["q_proj", "mlp.up_proj", "self_attn.v_proj"]) == ([], sorted(LAYERS))
    unknown, _ = unknown_target_modules(model_dir, ["qkv_proj", "attn.q_proj", "lm_head"])
    assert unknown == ["qkv_proj", "attn.q_proj"]  # PEFT matches whole dotted components only


def test_unknown_target_module_is_a_400_naming_the_field(client, upload, auth, model_dir) -> None:
    file_id = upload(content=line("ab")).json()["id"]
    r = _create(client, auth, file_id, lora={"target_modules": ["q_proj", "c_attn"]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "method.ipo.lora.target_modules" and err["code"] == "invalid_lora_target_modules"
    assert "c_attn" in err["message"] and "gate_proj" in err["message"] and "q_proj do" not in err["message"]
    assert _create(client, auth, file_id, lora={"target_modules": ["gate_proj", "down_proj"]}).status_code == 200


def test_max_length_below_a_prompt_is_a_400_with_its_lines(client, upload, auth, model_dir) -> None:
    long = "a" * 30
    content = line("ab") + line(long) + line("abc") + line(long + "b")
    file_id = upload(content=content).json()["id"]
    limit = prompt_tokens(long)
    r = _create(client, auth, file_id, hp={"max_length": limit})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "method.ipo.hyperparameters.max_length" and err["code"] == "max_length_too_short"
    assert "2 example(s) of training_file (lines 2, 4)" in err["message"], err["message"]
    assert f"the longest is {prompt_tokens(long + 'b')} tokens (line 4)" in err["message"]
    ok = _create(client, auth, file_id, hp={"max_length": prompt_tokens(long + "b") + 1})
    assert ok.status_code == 200, ok.text
    assert client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"][0]["id"] == ok.json()["id"]


def test_max_length_checks_the_validation_file_too(client, upload, auth, model_dir) -> None:
    train = upload(content=line("ab")).json()["id"]
    valid = upload(content=line("a" * 50), name="valid.jsonl").json()["id"]
    body = {
        "model": "char-model",
        "training_file": train,
        "validation_file": valid,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"max_length": 32}}},
    }
    r = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "method.dpo.hyperparameters.max_length"
    assert "of validation_file (lines 1)" in r.json()["error"]["message"]


def test_max_length_over_the_model_positions_is_a_400(client, upload, auth, model_dir) -> None:
    file_id = upload(content=line("ab")).json()["id"]
    r = _create(client, auth, file_id, hp={"max_length": 129})
    assert r.status_code == 400 and "128 positions" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "method.ipo.hyperparameters.max_length"


def test_a_corrupt_weights_header_is_a_clear_400(client, upload, auth, model_dir) -> None:
    (model_dir / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}")
    file_id = upload(content=line("ab")).json()["id"]
    r = _create(client, auth, file_id, lora={"target_modules": ["q_proj"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "corrupt safetensors header" in r.json()["error"]["message"]
