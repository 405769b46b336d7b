"""contracts.pair_tokens and contracts.max_length: the arithmetic the API and the worker share."""

from __future__ import annotations

import pytest

from contracts.max_length import MaxLengthError, resolve_max_length
from contracts.pair_tokens import PairTokens, describe_left_out, split_pair

TINY = {"hidden_size": 192, "num_hidden_layers": 3, "max_position_embeddings": 512}
MISTRAL_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "max_position_embeddings": 32768}


def test_split_pair_takes_the_common_prefix_as_the_prompt_like_trl() -> None:
    # prompt [1, 2, 3]; the chosen rendering merges the last prompt token (3 -> 9): the prompt is [1, 2]
    pair = split_pair([1, 2, 3], [1, 2, 9, 4, 5], [1, 2, 3, 4, 6])
    assert pair == PairTokens(prompt=2, chosen=3, rejected=3, common=0)
    assert split_pair([1, 2], [1, 2, 7, 8, 9], [1, 2, 7, 8]) == PairTokens(prompt=2, chosen=3, rejected=2, common=2)


@pytest.mark.parametrize(
    ("pair", "max_length", "identical"),
    [
        (PairTokens(prompt=10, chosen=50, rejected=50, common=40), 50, True),  # 40 kept, all shared
        (PairTokens(prompt=10, chosen=50, rejected=50, common=40), 51, False),  # 41 kept, only 40 shared
        (PairTokens(prompt=10, chosen=50, rejected=50, common=40), 60, False),
        (PairTokens(prompt=10, chosen=5, rejected=50, common=5), 60, False),  # chosen ends, rejected goes on
        (PairTokens(prompt=10, chosen=50, rejected=50, common=0), 11, False),  # one token each, different
        (PairTokens(prompt=10, chosen=50, rejected=50, common=1), 11, True),  # one token each, the same
        (PairTokens(prompt=64, chosen=5, rejected=5, common=5), 64, False),  # unusable, counted as such
    ],
)
def test_identical_after_truncation(pair: PairTokens, max_length: int, identical: bool) -> None:
    assert pair.identical_after_truncation(max_length) is identical


def test_unusable_and_truncated() -> None:
    pair = PairTokens(prompt=30, chosen=10, rejected=20, common=0)
    assert pair.unusable(30) and not pair.truncated(30)
    assert pair.truncated(49) and not pair.truncated(50) and pair.longest == 50


def test_describe_left_out_names_lines() -> None:
    said = describe_left_out([4], list(range(1, 15)), 64)
    assert "1 examples skipped: the prompt alone fills max_length=64 (lines 4)" in said
    assert "14 pairs left out" in said and "(lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 4 more)" in said


@pytest.mark.parametrize(
    ("requested", "config", "expected"),
    [
        ("auto", TINY, 64),
        ("auto", MISTRAL_7B, 1024),
        ("auto", {**MISTRAL_7B, "max_position_embeddings": 512}, 512),  # capped at the positions
        ("auto", {}, 1024),  # positions unknown
        (300, TINY, 300),
    ],
)
def test_resolve_max_length(requested: int | str, config: dict[str, int], expected: int) -> None:
    assert resolve_max_length(requested, config) == expected  # type: ignore[arg-type]


def test_an_explicit_max_length_over_the_positions_is_an_error() -> None:
    with pytest.raises(MaxLengthError, match="513 exceeds the model's 512 positions"):
        resolve_max_length(513, TINY)
