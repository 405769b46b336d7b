"""Chat templates: the named ones a job may choose, which one a job uses, and a model directory's own
template and special tokens, read as files (no transformers), so the API and the worker agree on them.

A job's ``method.<type>.chat_template`` is ``"auto"`` (the model's own template; a base model without one
gets ``DEFAULT_FOR_BASE_MODELS``, the recipe's Zephyr template), a name from ``NAMED_TEMPLATES``, or a
Jinja string (checked at job creation: it must compile in transformers' sandbox and render a plain
conversation). ``resolve_chat_template`` makes that choice for the API and the worker alike; the worker
sets it on the tokenizer, so it is also saved with the adapter.

``model_chat_template`` finds the template where transformers looks for it (``chat_template.jinja``, then
``tokenizer_config.json``'s ``chat_template``, a string or a list of named templates of which ``default``
is used); ``special_tokens`` lists the tokenizer's special tokens (``tokenizer.json``'s added tokens marked
special, plus the named ones of ``tokenizer_config.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when it is missing or not an object."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an ``AddedToken`` dict."""
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


NAMED_TEMPLATES: dict[str, str] = {
    # HuggingFaceH4/zephyr-7b-beta, tokenizer_config.json "chat_template" (also alignment-handbook's
    # DEFAULT_CHAT_TEMPLATE, which its recipes set on base models such as Mistral-7B-v0.1).
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
        "{% endfor %}"
    ),
    # ChatML as in the transformers chat-templating guide and teknium/OpenHermes-2.5-Mistral-7B's
    # tokenizer_config.json.
    "chatml": (
        "{% for message in messages %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json "chat_template".
    "llama-3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # mistralai/Mistral-7B-Instruct-v0.1, tokenizer_config.json "chat_template": user/assistant turns
    # only, strictly alternating (it raises on a system message).
    "mistral-instruct": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
}
"""Chat templates a job can name, copied verbatim from the model cards' tokenizer_config.json named above."""
DEFAULT_FOR_BASE_MODELS = "zephyr"
"""The seed recipe trains Mistral-7B-v0.1 (no template) the alignment-handbook way: with Zephyr's template."""
MAX_TEMPLATE_CHARS = 65536


class ChatTemplateError(ValueError):
    """A job's ``chat_template`` that is neither a known name nor a usable Jinja template."""


@dataclass(frozen=True)
class ChatTemplateChoice:
    """The template a job formats conversations with, and why."""

    name: str
    """``model`` (the model's own), a ``NAMED_TEMPLATES`` key, or ``custom`` (a Jinja string)."""
    template: str
    source: Literal["model", "named", "custom", "default"]
    """``default``: the model has none and the job said ``auto``, so ``DEFAULT_FOR_BASE_MODELS`` is used."""

    def describe(self, model: str) -> str:
        """A sentence for the job's events."""
        if self.source == "default":
            return (
                f"model {model!r} has no chat template (a base model): conversations are formatted with the "
                f"{self.name} template, the recipe's default; set method.<type>.chat_template to choose another"
            )
        if self.source == "model":
            return f"conversations are formatted with the chat template of model {model!r}"
        return f"conversations are formatted with the {self.name} chat template (method.<type>.chat_template)"


def resolve_chat_template(requested: str, model_dir: Path, *, probe: bool = True) -> ChatTemplateChoice:
    """The template for a job's ``chat_template`` (``"auto"``, a name or Jinja) and this model directory.
    Raises ``ChatTemplateError`` for a string that is neither a known name nor Jinja, and (``probe``) for
    a Jinja string that cannot render a conversation (``check_template_text``). The API passes
    ``probe=False`` and runs that check in a child process instead: a user's Jinja may loop for ever."""
    if requested == "auto":
        own = model_chat_template(model_dir)
        if own is not None:
            return ChatTemplateChoice("model", own, "model")
        return ChatTemplateChoice(DEFAULT_FOR_BASE_MODELS, NAMED_TEMPLATES[DEFAULT_FOR_BASE_MODELS], "default")
    if requested in NAMED_TEMPLATES:
        return ChatTemplateChoice(requested, NAMED_TEMPLATES[requested], "named")
    if probe:
        check_template_text(requested)
    elif "{{" not in requested and "{%" not in requested:
        raise ChatTemplateError(
            f"chat_template {requested[:40]!r} is neither a named template "
            f"({', '.join(NAMED_TEMPLATES)}, or auto) nor a Jinja template"
        )
    return ChatTemplateChoice("custom", requested, "custom")


def check_template_text(template: str) -> None:
    """Raises ``ChatTemplateError`` unless ``template`` is a Jinja chat template that compiles in a
    sandbox like transformers' and renders a user/assistant/user conversation with a generation prompt."""
    if "{{" not in template and "{%" not in template:
        names = ", ".join(NAMED_TEMPLATES)
        raise ChatTemplateError(
            f"chat_template {template[:40]!r} is neither a named template ({names}, or auto) nor a Jinja template"
        )
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"chat_template is too long: {len(template)} characters (limit {MAX_TEMPLATE_CHARS})")
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    probe = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    try:
        rendered = env.from_string(template).render(
            messages=probe, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
        )
    except Exception as exc:  # a syntax error, or a template that raises on a plain conversation
        message = template_message(exc)
        raise ChatTemplateError(f"chat_template cannot render a user/assistant conversation: {message}") from exc
    if "And 3 + 3?" not in rendered:
        raise ChatTemplateError("chat_template does not render the messages' content (message['content'])")


def model_chat_template(model_dir: Path) -> str | None:
    """The model's own chat template, or None for a base model without one."""
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def special_tokens(model_dir: Path) -> tuple[str, ...]:
    """The tokenizer's special tokens (sorted), e.g. ``("</s>", "<s>", "<unk>", "<|user|>")``."""
    found: set[str] = set()
    for token in read_json(model_dir / "tokenizer.json").get("added_tokens", []):
        if isinstance(token, dict) and token.get("special") and isinstance(token.get("content"), str):
            found.add(token["content"])
    config = read_json(model_dir / "tokenizer_config.json")
    for key in SPECIAL_TOKEN_KEYS:
        text = token_text(config.get(key))
        if text:
            found.add(text)
    for extra in config.get("additional_special_tokens") or config.get("extra_special_tokens") or []:
        text = token_text(extra)
        if text:
            found.add(text)
    return tuple(sorted(t for t in found if t.strip()))


def describe_template_refusals(refusals: list[tuple[int, str]], name: str, limit: int = 10) -> str:
    """One message for examples the chat template raises on, grouped by the template's message, e.g.
    ``the chat template refuses 2 examples of training_file: "System role not supported" (lines 2, 5)``."""
    by_message: dict[str, list[int]] = {}
    for line, message in refusals:
        by_message.setdefault(message, []).append(line)
    parts = []
    for message, lines in list(by_message.items())[:5]:
        shown = ", ".join(map(str, lines[:limit])) + (f" and {len(lines) - limit} more" if len(lines) > limit else "")
        parts.append(f"{json.dumps(message)} (line{'s' if len(lines) > 1 else ''} {shown})")
    if len(by_message) > 5:
        parts.append(f"and {len(by_message) - 5} other messages")
    noun = "example" if len(refusals) == 1 else "examples"
    return (
        f"the chat template refuses {len(refusals)} {noun} of {name}: " + "; ".join(parts) + ". Change those "
        "lines to the conversation shape the template accepts, or pick another chat template"
    )


def template_message(exc: Exception) -> str:
    """What a chat template said when it raised on a conversation: ``raise_exception``'s message as is
    (jinja2's plain ``TemplateError``), else the error's type and message (a template that fails on a
    conversation refuses it just the same)."""
    if type(exc).__name__ == "TemplateError":
        return str(exc) or "TemplateError"
    return f"{type(exc).__name__}: {exc}"
