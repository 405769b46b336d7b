"""contracts.chat_templates: which template a job formats with (named, Jinja, the model's own, or Zephyr's
for a base model without one), and what a job's ``chat_template`` may be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.services.prompt_lengths import PromptTokenizer
from contracts.chat_templates import (
    DEFAULT_FOR_BASE_MODELS,
    NAMED_TEMPLATES,
    ChatTemplateError,
    check_template_text,
    model_chat_template,
    resolve_chat_template,
    special_tokens,
)
from tests.api.test_model_fit import TEMPLATE, write_model

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
]


def base_model(path: Path) -> Path:
    """The character-level test model with its chat template removed (a base model)."""
    write_model(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_auto_is_the_models_own_template(tmp_path: Path) -> None:
    write_model(tmp_path / "m")
    choice = resolve_chat_template("auto", tmp_path / "m")
    assert (choice.name, choice.source, choice.template) == ("model", "model", TEMPLATE)


def test_a_base_model_gets_zephyr_by_default(tmp_path: Path) -> None:
    model = base_model(tmp_path / "m")
    assert model_chat_template(model) is None
    choice = resolve_chat_template("auto", model)
    assert (choice.name, choice.source) == (DEFAULT_FOR_BASE_MODELS, "default") == ("zephyr", "default")
    assert "has no chat template (a base model)" in choice.describe("m") and "zephyr" in choice.describe("m")


def test_a_template_file_wins_over_tokenizer_config_and_named_lists_use_default(tmp_path: Path) -> None:
    model = base_model(tmp_path / "m")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "{{ 1 }}"}, {"name": "default", "template": "{{ 2 }}"}]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert model_chat_template(model) == "{{ 2 }}"
    (model / "chat_template.jinja").write_text("{{ 3 }}")
    assert model_chat_template(model) == "{{ 3 }}"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "zephyr",
            "<|system|>\nbe brief</s>\n<|user|>\nhi</s>\n<|assistant|>\nhello</s>\n<|user|>\nbye</s>\n<|assistant|>\n",
        ),
        (
            "chatml",
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello"
            "<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "llama-3",
            "<s><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|><|start_header_id|>user"
            "<|end_header_id|>\n\nbye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
    ],
)
def test_named_templates_render_as_their_models_do(tmp_path: Path, name: str, expected: str) -> None:
    write_model(tmp_path / "m")
    tokenizer = PromptTokenizer(tmp_path / "m", resolve_chat_template(name, tmp_path / "m").template)
    assert tokenizer.render(CONVERSATION) == expected


def test_mistral_instruct_refuses_a_system_turn_and_alternates(tmp_path: Path) -> None:
    from jinja2 import TemplateError

    write_model(tmp_path / "m")
    tokenizer = PromptTokenizer(tmp_path / "m", NAMED_TEMPLATES["mistral-instruct"])
    assert tokenizer.render(CONVERSATION[1:]) == "<s>[INST] hi [/INST]hello</s>[INST] bye [/INST]"
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        tokenizer.render(CONVERSATION)


def test_a_jinja_string_is_a_custom_template(tmp_path: Path) -> None:
    write_model(tmp_path / "m")
    jinja = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    choice = resolve_chat_template(jinja, tmp_path / "m")
    assert (choice.name, choice.source, choice.template) == ("custom", "custom", jinja)


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("vicuna", "neither a named template (zephyr, chatml, llama-3, mistral-instruct, or auto)"),
        ("{% for m in messages %}{{ m['content'] }", "cannot render a user/assistant conversation"),
        ("{{ raise_exception('nope') }}", "cannot render a user/assistant conversation: nope"),
        ("{{ messages | length }}", "does not render the messages' content"),
        ("{{ ''.__class__.__mro__ }}{% for m in messages %}{{ m.content }}{% endfor %}", "cannot render"),
    ],
)
def test_unusable_templates_are_refused(template: str, reason: str) -> None:
    with pytest.raises(ChatTemplateError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_template_text(template)


def test_special_tokens_are_read_from_the_tokenizer_files(tmp_path: Path) -> None:
    write_model(tmp_path / "m")
    assert special_tokens(tmp_path / "m") == ("</s>", "<s>", "<|assistant|>", "<|system|>", "<|user|>")


def test_the_model_list_and_jobs_agree_on_whether_a_model_has_a_template(tmp_path: Path) -> None:
    from contracts.model_info import has_chat_template

    write_model(tmp_path / "chat")
    base = base_model(tmp_path / "base")
    assert has_chat_template(tmp_path / "chat") and resolve_chat_template("auto", tmp_path / "chat").source == "model"
    assert not has_chat_template(base) and resolve_chat_template("auto", base).source == "default"
    (base / "chat_template.json").write_text('{"chat_template": "{{ 1 }}"}')  # a processor's file, not read
    assert not has_chat_template(base) and resolve_chat_template("auto", base).source == "default"
    (base / "tokenizer_config.json").write_text("{not json")
    assert not has_chat_template(base)
