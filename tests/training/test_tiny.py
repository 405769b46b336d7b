from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, BatchEncoding

from worker.training import demo_data


def _input_ids(encoded: Any) -> list[int]:
    """``apply_chat_template(..., tokenize=True, return_dict=True)``'s token ids (its return type is a union)."""
    assert isinstance(encoded, BatchEncoding)
    return list(encoded["input_ids"])


def test_chat_template_prompt_is_a_token_prefix(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cases = [
        ([{"role": "user", "content": "What is 3 plus 4?"}], "The sum is 7."),
        (
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
            "Hello! 12 + 3 = 15 :)",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "unseen wörds ünïcode\nand newlines  "},
            ],
            "\n leading newline and trailing space ",
        ),
    ]
    for prompt, reply in cases:
        p = _input_ids(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True))
        full = _input_ids(
            tok.apply_chat_template([*prompt, {"role": "assistant", "content": reply}], tokenize=True, return_dict=True)
        )
        assert list(full[: len(p)]) == list(p), (prompt, reply)
        assert len(full) > len(p)
        text = tok.decode(full)
        assert isinstance(text, str)
        assert text.startswith("<s><|") and "<|assistant|>\n" + reply + "</s>" in text


def test_tiny_model_is_mistral_with_gqa(tiny_model_dir: Path) -> None:
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    assert cfg.model_type == "mistral"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert (tiny_model_dir / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.bos_token and tok.eos_token and tok.pad_token and tok.unk_token and tok.chat_template


def test_demo_data_and_judge(tmp_path: Path) -> None:
    train, valid = demo_data.write_demo_data(tmp_path, n_train=50, n_valid=20)
    assert len(train.read_text().splitlines()) == 50
    train_prompts = {line for line in train.read_text().splitlines()}
    train_pairs, valid_pairs = demo_data.split_pairs(0)
    assert not set(train_pairs) & set(valid_pairs)
    assert not train_prompts & set(valid.read_text().splitlines())
    assert demo_data.judge("What is 3 plus 4?", "The sum is 7.")
    assert not demo_data.judge("What is 3 plus 4?", "The product is 12.")
    assert not demo_data.judge("What is 3 plus 4?", "The sum is 8.")
    corpus = demo_data.pretraining_conversations(0)
    sums = sum(c[1]["content"].startswith("The sum") for c in corpus)
    assert sums * 2 == len(corpus)  # correct and wrong answers in equal measure
