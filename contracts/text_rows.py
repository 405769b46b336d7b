"""What is done with text rows (``{"prompt": str, "chosen": str, "rejected": str}`` and the implicit-prompt
text shape): templated, or used verbatim. One rule, applied by the validator, the API and the worker.

- Plain text rows are chat turns: the prompt becomes one user message, each reply one assistant message,
  and the model's chat template is applied (``"chat_template"``).
- Text that already carries chat markup or a dialogue transcript is never templated a second time:
  the markers of common chat templates (``MARKERS``: ChatML, Llama 2/3, Mistral, Zephyr, Gemma, Phi-3,
  Alpaca/Vicuna headers), Anthropic HH's ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` turns, the base model's
  own special tokens (given by the caller that has the tokenizer), or an implicit prompt in text (the
  replies are whole transcripts, which TRL never templates). When every text row of the file carries
  one, they are used verbatim, as TRL's standard text format does (``"verbatim"``: prompt + reply
  tokenized as written, TRL appends EOS to the reply). When only some do, those lines are refused with
  the reason (templating them would format them twice; using the plain ones verbatim would train them
  without a template).
  One mode per file, because a data set is either written for a template or already formatted; the
  mode and the lines that decided it are recorded (``TextRowsPlan.describe``), on the file's validation
  report and in the job's events and resolved hyperparameters.
- A top-level ``system`` field cannot be placed into text that is used verbatim: such lines are refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

TextMode = Literal["chat_template", "verbatim"]

MARKERS: tuple[tuple[str, str], ...] = (
    ("<|im_start|>", "ChatML"),
    ("<|im_end|>", "ChatML"),
    ("<|start_header_id|>", "Llama 3"),
    ("<|eot_id|>", "Llama 3"),
    ("<|begin_of_text|>", "Llama 3"),
    ("[INST]", "Llama 2 / Mistral"),
    ("[/INST]", "Llama 2 / Mistral"),
    ("<<SYS>>", "Llama 2"),
    ("<|user|>", "Zephyr / Phi-3"),
    ("<|assistant|>", "Zephyr / Phi-3"),
    ("<|system|>", "Zephyr / Phi-3"),
    ("<start_of_turn>", "Gemma"),
    ("<end_of_turn>", "Gemma"),
    ("### Instruction:", "Alpaca"),
    ("### Response:", "Alpaca"),
    ("### Human:", "Vicuna / OpenAssistant"),
    ("### Assistant:", "Vicuna / OpenAssistant"),
)
"""Role markers of common chat templates; text holding one was formatted for some template already."""
_HH = re.compile(r"\n\n(Human|Assistant):")
"""Anthropic HH-RLHF turns: a transcript, as the HH data set is published and usually split."""


class _TextRow(Protocol):
    line: int
    text: tuple[str, str, str] | None
    system: str | None
    text_implicit: bool
    verbatim: bool


def find_markup(texts: Iterable[str], special_tokens: Sequence[str] = ()) -> str | None:
    """What in ``texts`` is chat markup (a readable description), or None for plain text."""
    for text in texts:
        for marker, template in MARKERS:
            if marker in text:
                return f"the {template} marker {marker!r}"
        match = _HH.search(text)
        if match:
            return f'an Anthropic HH transcript ("\\n\\n{match.group(1)}:")'
        for token in special_tokens:
            if token and token in text:
                return f"the tokenizer's special token {token!r}"
    return None


@dataclass
class TextRowsPlan:
    """The file's text rows and what is done with them."""

    mode: TextMode | None = None
    """None: the file has no text rows."""
    n_rows: int = 0
    marked_lines: list[int] = field(default_factory=list)
    """Lines whose text carries markup (first 10)."""
    n_marked: int = 0
    reason: str | None = None
    """What the first marked line carries."""
    refused: list[tuple[int, str]] = field(default_factory=list)
    """(line, reason) of rows that cannot be used in this mode."""

    def describe(self) -> str | None:
        """One sentence for the validation report and the job's events; None without text rows."""
        if self.mode is None:
            return None
        if self.mode == "chat_template":
            plain = self.n_rows - self.n_marked
            return (
                f"{plain} text rows: each prompt becomes a user turn and each reply an assistant turn, "
                "formatted with the chat template (no chat markup found in them)"
                + (f"; {self.n_marked} rows that carry chat markup are refused" if self.n_marked else "")
            )
        lines = ", ".join(map(str, self.marked_lines)) + (" ..." if self.n_marked > len(self.marked_lines) else "")
        return (
            f"{self.n_rows} text rows used verbatim (TRL's text format: no chat template applied, EOS appended "
            f"to each reply), because {self.n_marked} of them already carry chat markup or a transcript "
            f"(line {self.marked_lines[0]}: {self.reason}; lines {lines})"
        )


def plan_text_rows(rows: Sequence[_TextRow], special_tokens: Sequence[str] = ()) -> TextRowsPlan:
    """Decide the file's text mode and mark each text row's ``verbatim`` accordingly (see module doc).

    ``special_tokens``: the base model's special tokens (``<s>``, ``<|user|>``...), when the caller has the
    tokenizer; without them only ``MARKERS`` and HH turns count.
    """
    plan = TextRowsPlan()
    text_rows = [row for row in rows if row.text is not None]
    if not text_rows:
        return plan
    plan.n_rows = len(text_rows)
    found: dict[int, str] = {}
    for row in text_rows:
        assert row.text is not None
        markup = find_markup(row.text, special_tokens)
        if markup is None and row.text_implicit:
            markup = "an implicit prompt in text (chosen and rejected are whole transcripts, TRL's text format)"
        if markup is not None:
            found[row.line] = markup
    plan.n_marked = len(found)
    plan.marked_lines = sorted(found)[:10]
    plan.reason = found[plan.marked_lines[0]] if found else None
    if 0 < len(found) < len(text_rows):
        # Some rows carry markup, others are plain: templating the marked ones would format them twice, and
        # using the plain ones verbatim would train them without any template. Refuse the marked ones.
        first_plain = next(row.line for row in text_rows if row.line not in found)
        plan.mode = "chat_template"
        plan.refused = [
            (
                line,
                f"this text row carries {markup} but the file's other text rows are plain (line {first_plain}); "
                "a file's text rows are either all plain (formatted with the chat template) or all already "
                "formatted (used verbatim): write this one like the others",
            )
            for line, markup in sorted(found.items())
        ]
        return plan
    plan.mode = "verbatim" if found else "chat_template"
    for row in text_rows:
        row.verbatim = plan.mode == "verbatim"
        if row.verbatim and row.system is not None:
            plan.refused.append(
                (
                    row.line,
                    "a top-level system field cannot be combined with text rows used verbatim (the file's text "
                    f"carries chat markup: line {plan.marked_lines[0]}, {plan.reason}); "
                    "write the system text into the prompt",
                )
            )
    return plan
