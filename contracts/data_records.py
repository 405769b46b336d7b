"""One preference record (a parsed JSON object) -> its shape and its normalised messages, or ``BadLine``.

The rules (``contracts/data_formats.py`` documents the accepted shapes):

- **Nothing is dropped silently.** A message is ``role`` + ``content``; any other key that carries a
  value (``tool_calls``, ``name``, ``weight``, ``reasoning_content``...) refuses the line with the key's
  name, unless it is bookkeeping (``IGNORED_MESSAGE_KEYS``). A ``tool`` or ``function`` turn, a
  ``tool_calls`` entry or a non-empty ``tools`` list refuses the line: "tool calls are not supported"
  (the chat templates this service applies have no tool syntax, so the call would vanish from training).
  A record's top-level ``system`` string (axolotl's and Intel orca_dpo_pairs' shape) becomes the
  prompt's system message; other content-bearing top-level keys (``TOP_LEVEL_CONTENT_KEYS``) refuse it.
- **What TRL and OpenAI accept is accepted.** Content may be a string or a list of text parts
  (``[{"type": "text", "text": ...}]``, OpenAI's shape; joined with no separator, as chat templates that
  iterate over parts render them); other part types are refused by name. Text rows may have an implicit
  prompt (``{"chosen": str, "rejected": str}``), split like TRL's ``extract_prompt``.
- **Foreign shapes are named.** LLaMA-Factory's ShareGPT preference shape (``conversations`` of
  ``from``/``value`` turns, ``chosen``/``rejected`` turn objects) is converted (``human`` -> user,
  ``gpt`` -> assistant, ``system`` -> system); other known shapes (SFT conversations, KTO's unpaired
  format, Alpaca, StackExchange-paired, orca_dpo_pairs' ``question``) get a reason that names them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function", "ipython")
TOOL_KEYS = ("tool_calls", "function_call", "tool_call_id")
IGNORED_MESSAGE_KEYS = frozenset({"id", "timestamp", "created_at", "metadata", "annotations", "refusal"})
"""Message keys that carry bookkeeping, not text the model is trained on (``refusal``/``annotations`` are
OpenAI response fields, null or empty in exported conversations: a non-empty ``refusal`` is refused)."""
TOP_LEVEL_CONTENT_KEYS = {
    "tools": "tool definitions are not supported (tool calls are not supported: the prompt would be trained "
    "without them)",
    "images": "images are not supported (text-only training)",
    "image": "images are not supported (text-only training)",
    "history": 'a "history" field (LLaMA-Factory\'s Alpaca shape) is not supported: put the earlier turns into '
    "the prompt as messages",
    "chat_template_kwargs": "per-example chat template arguments are not supported",
}
"""Top-level keys whose content training would need; a line carrying one with a value is refused."""
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SHAPES = ("openai_preference", "sharegpt", "text", "conversational", "implicit_prompt", "text_implicit_prompt")
_SHAPE_KEYS: tuple[tuple[str, frozenset[str]], ...] = (
    ("openai_preference", frozenset({"input", "preferred_output", "non_preferred_output"})),
    ("text or conversational", frozenset({"prompt", "chosen", "rejected"})),
    ("implicit_prompt", frozenset({"chosen", "rejected"})),
)
_EXPECTED = (
    'expected {"prompt", "chosen", "rejected"} (text or conversational), {"chosen", "rejected"} '
    '(implicit prompt) or {"input", "preferred_output", "non_preferred_output"} (OpenAI preference)'
)
_FOREIGN: tuple[tuple[frozenset[str], str], ...] = (
    (
        frozenset({"question", "response_j", "response_k"}),
        'the StackExchange-paired shape ("question", "response_j", "response_k"): rename them to "prompt", '
        '"chosen" (response_j, the preferred one) and "rejected"',
    ),
    (
        frozenset({"question", "chosen", "rejected"}),
        'the Intel orca_dpo_pairs shape ("question" instead of "prompt"): rename "question" to "prompt" '
        '(a "system" field is used as the system message)',
    ),
    (
        frozenset({"prompt", "completion", "label"}),
        "TRL's unpaired preference (KTO) shape: one completion with a true/false label, not a chosen/rejected "
        "pair; IPO and DPO train on pairs",
    ),
    (
        frozenset({"prompt", "completion"}),
        "a prompt-completion (supervised fine-tuning) example, not a preference pair: a pair needs a "
        '"chosen" and a "rejected" reply',
    ),
    (
        frozenset({"instruction", "output"}),
        "the Alpaca instruction shape (supervised fine-tuning), not a preference pair: a pair needs a "
        '"chosen" and a "rejected" reply',
    ),
    (
        frozenset({"conversations"}),
        "a ShareGPT conversation (supervised fine-tuning), not a preference pair: LLaMA-Factory's preference "
        'shape adds "chosen" and "rejected" turns next to "conversations"',
    ),
    (
        frozenset({"messages"}),
        "a chat conversation (OpenAI / TRL supervised fine-tuning shape), not a preference pair: OpenAI's "
        'preference shape is {"input": {"messages": [...]}, "preferred_output": [...], '
        '"non_preferred_output": [...]}',
    ),
    (
        frozenset({"text"}),
        "plain text (language-modelling shape), not a preference pair",
    ),
)


class BadLine(Exception):
    """One line's problem; the scanner turns it into a ``LineError``."""


@dataclass
class Normalised:
    """A record as training sees it: messages, plus the strings of a text row (used verbatim when the
    file's text rows carry chat markup; see ``contracts/text_rows.py``)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    text: tuple[str, str, str] | None = None
    """(prompt, chosen, rejected) of a text row, exactly as given (an implicit prompt: as split)."""
    system: str | None = None
    """The record's top-level ``system`` field, already prepended to ``prompt``."""


def shape_of(record: dict[str, object]) -> str:
    """The record's shape (one of ``SHAPES``); raises ``BadLine`` naming the shape it looks like."""
    keys = record.keys()
    if _SHAPE_KEYS[0][1] <= keys:
        return "openai_preference"
    if {"conversations", "chosen", "rejected"} <= keys:
        return "sharegpt"
    if "question" in keys and "prompt" not in keys:
        for required, name in _FOREIGN:
            if required <= keys:
                raise BadLine(f"unknown shape: this looks like {name}")
    if _SHAPE_KEYS[2][1] <= keys:
        chosen_is_text = isinstance(record["chosen"], str)
        if "prompt" not in keys:
            return "text_implicit_prompt" if chosen_is_text else "implicit_prompt"
        if isinstance(record["prompt"], str):
            # UltraFeedback-binarized carries a plain-text "prompt" next to full conversations in
            # chosen/rejected; like TRL's maybe_extract_prompt, the conversations win.
            return "implicit_prompt" if isinstance(record["chosen"], list) else "text"
        return "conversational"
    for required, name in _FOREIGN:
        if required <= keys:
            raise BadLine(f"unknown shape: this looks like {name}")
    found = sorted(keys)
    shown = ", ".join(json.dumps(clip(k, 40)) for k in found[:10]) + (", ..." if len(found) > 10 else "")
    name, required = max(_SHAPE_KEYS, key=lambda s: (len(s[1] & keys), -len(s[1] - keys)))
    hint = ""
    if required & keys:
        missing = ", ".join(json.dumps(k) for k in sorted(required - keys))
        hint = f" (looks like {name} but is missing {missing})"
    raise BadLine(f"unknown shape: found keys [{shown}]{hint}, {_EXPECTED}")


def normalise(record: dict[str, object], shape: str) -> Normalised:
    """Messages (prompt ending with a user turn, assistant replies) for a record of ``shape``; raises
    ``BadLine`` for anything that cannot be trained on faithfully."""
    text: tuple[str, str, str] | None = None
    if shape == "text":
        for field in ("prompt", "chosen", "rejected"):
            if not isinstance(record[field], str):
                raise BadLine(f"text format: {field} must be a string (got {json_type(record[field])})")
        text = (str(record["prompt"]), str(record["chosen"]), str(record["rejected"]))
    elif shape == "text_implicit_prompt":
        text = _split_text_implicit(record)
    if text is not None:
        prompt = messages([{"role": "user", "content": text[0]}], "prompt")
        chosen = messages([{"role": "assistant", "content": text[1]}], "chosen")
        rejected = messages([{"role": "assistant", "content": text[2]}], "rejected")
    elif shape == "conversational":
        prompt = messages(record["prompt"], "prompt")
        chosen = messages(record["chosen"], "chosen")
        rejected = messages(record["rejected"], "rejected")
    elif shape == "openai_preference":
        given = record["input"]
        if not isinstance(given, dict) or "messages" not in given:
            raise BadLine(f'input must be an object with a "messages" list (got {json_type(given)})')
        prompt = messages(given["messages"], "input.messages")
        chosen = messages(record["preferred_output"], "preferred_output")
        rejected = messages(record["non_preferred_output"], "non_preferred_output")
        if _has_value(given.get("tools")):
            raise BadLine("input.tools: " + TOP_LEVEL_CONTENT_KEYS["tools"])
    elif shape == "sharegpt":
        prompt, chosen, rejected = _sharegpt(record)
    else:
        prompt, chosen, rejected = _split_implicit(record)
    for key, why in TOP_LEVEL_CONTENT_KEYS.items():
        if _has_value(record.get(key)):
            raise BadLine(f'"{key}": {why}')
    names = ("preferred_output", "non_preferred_output") if shape == "openai_preference" else ("chosen", "rejected")
    prompt_name = {"openai_preference": "input.messages", "sharegpt": "conversations"}.get(shape, "prompt")
    system = _system_field(record, prompt)
    if system is not None:
        prompt = [{"role": "system", "content": system}, *prompt]
    _check_prompt(prompt, prompt_name)
    _check_reply(chosen, names[0])
    _check_reply(rejected, names[1])
    if [(m["role"], m["content"].strip()) for m in chosen] == [(m["role"], m["content"].strip()) for m in rejected]:
        raise BadLine(f"{names[0]} and {names[1]} are identical")
    return Normalised(prompt=prompt, chosen=chosen, rejected=rejected, text=text, system=system)


def _system_field(record: dict[str, object], prompt: list[Message]) -> str | None:
    value = record.get("system")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadLine(f"system must be a string (got {json_type(value)})")
    if prompt and prompt[0]["role"] == "system":
        raise BadLine("both a top-level system field and a system message in the prompt: keep one")
    return value


def _split_text_implicit(record: dict[str, object]) -> tuple[str, str, str]:
    """TRL's ``extract_prompt`` on strings: the longest common prefix is the prompt (a space that starts
    the first differing word goes with the replies)."""
    chosen, rejected = record["chosen"], record["rejected"]
    if not isinstance(rejected, str) or not isinstance(chosen, str):
        raise BadLine(
            f"implicit prompt: chosen and rejected must both be strings or both lists of messages "
            f"(got {json_type(chosen)} and {json_type(rejected)})"
        )
    if chosen.strip() == rejected.strip():
        raise BadLine("chosen and rejected are identical")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n and chosen[n - 1] == " ":
        n -= 1
    if not chosen[:n].strip():
        raise BadLine(
            'implicit prompt: chosen and rejected share no prompt (their text differs from the start); add a "prompt"'
        )
    return chosen[:n], chosen[n:], rejected[n:]


def _split_implicit(record: dict[str, object]) -> tuple[list[Message], list[Message], list[Message]]:
    for field in ("chosen", "rejected"):
        if isinstance(record[field], str):
            raise BadLine(
                f"implicit prompt: {field} is a string but the other reply is a list of messages; "
                "use strings for both (text) or messages for both"
            )
    chosen = messages(record["chosen"], "chosen")
    rejected = messages(record["rejected"], "rejected")
    if chosen == rejected:
        raise BadLine("chosen and rejected are identical")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise BadLine("implicit prompt: chosen and rejected share no prompt (their first messages differ)")
    if chosen[n - 1]["role"] != "user":
        raise BadLine(
            "implicit prompt: the common prefix of chosen and rejected must end with a user turn "
            f'(its last message, {n}, is "{chosen[n - 1]["role"]}")'
        )
    for field, rest in (("chosen", chosen[n:]), ("rejected", rejected[n:])):
        if not rest:
            raise BadLine(f"{field} is empty: no reply after the shared prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def _sharegpt(record: dict[str, object]) -> tuple[list[Message], list[Message], list[Message]]:
    """LLaMA-Factory's ShareGPT preference shape converted to messages."""
    out: list[list[Message]] = []
    for field in ("conversations", "chosen", "rejected"):
        value = record[field]
        turns = [value] if isinstance(value, dict) else value
        if not isinstance(turns, list):
            raise BadLine(f"ShareGPT shape: {field} must be a list of turns or one turn (got {json_type(value)})")
        converted: list[object] = []
        for i, turn in enumerate(turns, 1):
            where = f"{field} turn {i}"
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise BadLine(f'ShareGPT shape: {where} must be an object with "from" and "value"')
            speaker = turn["from"]
            if speaker in ("function_call", "observation"):
                raise BadLine(f'{where}: tool calls are not supported (a "{speaker}" turn)')
            if speaker not in SHAREGPT_ROLES:
                shown = json.dumps(clip(speaker, 40)) if isinstance(speaker, str) else json_type(speaker)
                raise BadLine(f"ShareGPT shape: {where}: from {shown} is not one of human, gpt, system")
            extra = {k: v for k, v in turn.items() if k not in ("from", "value")}
            converted.append({"role": SHAREGPT_ROLES[str(speaker)], "content": turn["value"], **extra})
        out.append(messages(converted, field))
    return out[0], out[1], out[2]


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
            if _has_value(msg.get(key)):
                raise BadLine(f"{where}: tool calls are not supported (it carries {key})")
        if role not in ROLES:
            shown = json.dumps(clip(role, 40)) if isinstance(role, str) else json_type(role)
            raise BadLine(f"{where}: role {shown} is not one of system, user, assistant")
        if "content" not in msg:
            raise BadLine(f'{where} has no "content"')
        for key, extra in msg.items():
            if key not in ("role", "content") and key not in IGNORED_MESSAGE_KEYS and _has_value(extra):
                raise BadLine(
                    f'{where}: key "{clip(key, 40)}" is not used in training (only "role" and "content" are); '
                    "remove it, or fold its text into content"
                )
        if _has_value(msg.get("refusal")):
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


def _check_prompt(prompt: list[Message], field: str) -> None:
    last = prompt[-1]
    if last["role"] != "user":
        raise BadLine(f'{field} must end with a user turn (its last message is "{last["role"]}")')
    if not last["content"].strip():
        raise BadLine(f"{field} is empty: its last user turn has no text")


def _check_reply(reply: list[Message], field: str) -> None:
    for i, msg in enumerate(reply, 1):
        if msg["role"] != "assistant":
            raise BadLine(f'{field} message {i}: role must be "assistant" (got "{msg["role"]}")')
        if not msg["content"].strip():
            raise BadLine(f"{field} is empty" if len(reply) == 1 else f"{field} message {i} is empty")


def _has_value(value: object) -> bool:
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
