"""Chat templates and special tokens of a model directory, read as files (no transformers), so the API and
the worker agree on them.

``model_chat_template`` finds the template where transformers looks for it (``chat_template.jinja``, then
``tokenizer_config.json``'s ``chat_template``, a string or a list of named templates of which ``default``
is used); ``special_tokens`` lists the tokenizer's special tokens (``tokenizer.json``'s added tokens marked
special, plus the named ones of ``tokenizer_config.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
