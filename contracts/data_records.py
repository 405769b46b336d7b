"""One preference record (a parsed JSON object) -> its shape and its normalised messages, or ``BadLine``.

The rules (``contracts/data_formats.py`` documents the accepted shapes):

- **Nothing is dropped silently.** A message is ``role`` + ``content``; any other key that carries a
  value (``tool_calls``, ``name``, ``weight``, ``reasoning_content``...) refuses the line with the key's
  name, unless it is bookkeeping (``data_messages.IGNORED_MESSAGE_KEYS``). A ``tool`` or ``function`` turn, a
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

from contracts.data_messages import BadLine, Message, clip, has_value, json_type, messages

__all__ = ["SHAPES", "BadLine", "Message", "Normalised", "clip", "json_type", "normalise", "shape_of"]

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
        if has_value(given.get("tools")):
            raise BadLine("input.tools: " + TOP_LEVEL_CONTENT_KEYS["tools"])
    elif shape == "sharegpt":
        prompt, chosen, rejected = _sharegpt(record)
    else:
        prompt, chosen, rejected = _split_implicit(record)
    for key, why in TOP_LEVEL_CONTENT_KEYS.items():
        if has_value(record.get(key)):
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
