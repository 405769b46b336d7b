"""How a tokenized preference pair fares at a ``max_length``: the arithmetic of TRL 1.16's ``DPOTrainer``,
shared by the API (job creation, ``ipo data validate --model``) and the worker so they agree.

TRL tokenizes ``prompt``, ``prompt + chosen`` and ``prompt + rejected``, takes the prompt to be the
common prefix of the three (``common_prefix_length``), drops a pair whose prompt has ``max_length`` tokens
or more, and otherwise cuts ``prompt + reply`` to its first ``max_length`` tokens (``truncation_mode=
"keep_start"``). A pair whose two replies share their first ``max_length - prompt`` tokens is then the
same sequence twice: no preference signal, and IPO's loss pulls its (zero) margin towards ``1/(2*beta)``
for nothing. Such pairs are counted, named by line, and kept out of training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PairTokens:
    """Token counts of one pair, split as TRL splits it."""

    prompt: int
    """Prompt tokens (the generation prompt included)."""
    chosen: int
    """Tokens of the chosen completion (after the prompt, EOS / end-of-turn included)."""
    rejected: int
    common: int
    """Leading tokens the two completions share."""

    @property
    def longest(self) -> int:
        """Prompt + the longer completion: what must fit ``max_length`` for nothing to be cut."""
        return self.prompt + max(self.chosen, self.rejected)

    def unusable(self, max_length: int) -> bool:
        """The prompt alone fills ``max_length``: TRL drops the pair (no completion token is left)."""
        return self.prompt >= max_length

    def truncated(self, max_length: int) -> bool:
        return not self.unusable(max_length) and self.longest > max_length

    def identical_after_truncation(self, max_length: int) -> bool:
        """Both completions, cut to the ``max_length - prompt`` tokens left, are the same tokens."""
        if self.unusable(max_length):
            return False
        room = max_length - self.prompt
        kept_chosen, kept_rejected = min(room, self.chosen), min(room, self.rejected)
        return kept_chosen == kept_rejected and self.common >= kept_chosen


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def split_pair(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> PairTokens:
    """``PairTokens`` of a pair from the ids of ``prompt``, ``prompt + chosen`` and ``prompt + rejected``."""
    n = min(_common_prefix(prompt_ids, chosen_ids), _common_prefix(prompt_ids, rejected_ids))
    chosen, rejected = chosen_ids[n:], rejected_ids[n:]
    return PairTokens(prompt=n, chosen=len(chosen), rejected=len(rejected), common=_common_prefix(chosen, rejected))


def describe_lines(lines: Sequence[int], total: int | None = None, limit: int = 10) -> str:
    """``"3, 7, 9"`` or ``"3, 7, ... and 12 more"``: the first ``limit`` line numbers of ``total``."""
    total = len(lines) if total is None else total
    shown = ", ".join(str(n) for n in list(lines)[:limit])
    return shown + (f" and {total - min(limit, len(lines))} more" if total > min(limit, len(lines)) else "")


def describe_left_out(unusable: list[int], identical: list[int], max_length: int) -> str:
    """The examples left out of training at ``max_length`` and why (the API says the same at creation)."""
    parts = []
    if unusable:
        parts.append(
            f"{len(unusable)} examples skipped: the prompt alone fills max_length={max_length} "
            f"(lines {describe_lines(unusable)})"
        )
    if identical:
        parts.append(
            f"{len(identical)} pairs left out: chosen and rejected are the same tokens once cut at "
            f"max_length={max_length}, so they carry no preference (lines {describe_lines(identical)})"
        )
    return "; ".join(parts)
