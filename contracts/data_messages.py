"""One chat message as training sees it: ``role`` + ``content`` (a string, or OpenAI's text parts joined),
and the rule that nothing else a message carries is dropped silently (see ``contracts/data_records.py``).
Pure stdlib; shared by the validator's record shapes."""

from __future__ import annotations

import json

Message = dict[str, str]

ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function", "ipython")
TOOL_KEYS = ("tool_calls", "function_call", "tool_call_id")
IGNORED_MESSAGE_KEYS = frozenset({"id", "timestamp", "created_at", "metadata", "annotations", "refusal"})
"""Message keys that carry bookkeeping, not text the model is trained on (``refusal``/``annotations`` are
OpenAI response fields, null or empty in exported conversations: a non-empty ``refusal`` is refused)."""


class BadLine(Exception):
    """One line's problem; the scanner turns it into a ``LineError``."""


def messages(value: object, field: str) -> list[Message]:
    """A list of ``{"role", "content"}`` messages; content parts joined; raises ``BadLine`` otherwise."""
    if not isinstance(value, list):
        raise BadLine(f"{field} must be a list of messages (got {json_type(value)})")
    if not value:
        raise BadLine(f"{field} is empty")
    out: list[Message] = []
    for i, msg in enumerate(value, 1):
        where = f"{field} message {i}"
        if not isinstance(msg, dict):
            raise BadLine(f"{where} must be an object (got {json_type(msg)})")
        if "role" not in msg and {"from", "value"} <= msg.keys():
            raise BadLine(f'{where} has "from"/"value" keys (ShareGPT turns) where "role"/"content" are expected')
        if "role" not in msg:
            raise BadLine(f'{where} has no "role"')
        role = msg["role"]
        if role in TOOL_ROLES:
            raise BadLine(f'{where}: tool calls are not supported (a "{role}" turn carries a tool result)')
        for key in TOOL_KEYS:
            if has_value(msg.get(key)):
                raise BadLine(f"{where}: tool calls are not supported (it carries {key})")
        if role not in ROLES:
            shown = json.dumps(clip(role, 40)) if isinstance(role, str) else json_type(role)
            raise BadLine(f"{where}: role {shown} is not one of system, user, assistant")
        if "content" not in msg:
            raise BadLine(f'{where} has no "content"')
        for key, extra in msg.items():
            if key not in ("role", "content") and key not in IGNORED_MESSAGE_KEYS and has_value(extra):
                raise BadLine(
                    f'{where}: key "{clip(key, 40)}" is not used in training (only "role" and "content" are); '
                    "remove it, or fold its text into content"
                )
        if has_value(msg.get("refusal")):
            raise BadLine(f'{where}: key "refusal" is not used in training; fold its text into content')
        content = _content(msg["content"], where)
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise BadLine(f"{where}: content is not valid Unicode (lone surrogate escape)") from None
        out.append({"role": str(role), "content": content})
    return out


def _content(content: object, where: str) -> str:
    """A string, or OpenAI's list of text parts joined with no separator."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadLine(f"{where}: content must be a string or a list of text parts (got {json_type(content)})")
    texts: list[str] = []
    for j, part in enumerate(content, 1):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part, dict) or not isinstance(part.get("text"), str):
            shown = json.dumps(clip(kind, 40)) if isinstance(kind, str) else json_type(part)
            raise BadLine(
                f'{where}: content part {j} is {shown}: only text parts ({{"type": "text", "text": ...}}) are supported'
            )
        texts.append(part["text"])
    return "".join(texts)


def has_value(value: object) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
