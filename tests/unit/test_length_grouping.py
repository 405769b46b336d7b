"""worker.training.batching: lengths of preference pairs, the seeded length-grouped order, eval order."""

from __future__ import annotations

import random

import torch
from datasets import Dataset
from transformers.trainer_pt_utils import get_length_grouped_indices

from worker.training.batching import (
    LENGTH_BUCKET,
    LongestFirstSampler,
    SeededLengthGroupedSampler,
    length_grouped_order,
    pair_lengths,
)


def _pairs(lengths: list[tuple[int, int, int]]) -> Dataset:
    return Dataset.from_list(
        [{"prompt_ids": [1] * p, "chosen_ids": [2] * c, "rejected_ids": [3] * r} for p, c, r in lengths]
    )


def test_pair_length_is_prompt_plus_the_longer_reply_cut_at_max_length() -> None:
    data = _pairs([(5, 3, 4), (10, 2, 1), (60, 10, 30)])
    assert pair_lengths(data, None) == [9, 12, 90]
    assert pair_lengths(data, 64) == [9, 12, 64]
    # a filtered dataset (TRL drops prompts that fill max_length) keeps its own rows and order
    assert pair_lengths(data.filter(lambda row: len(row["prompt_ids"]) != 10), 64) == [9, 64]


def _padded_tokens(order: list[int], lengths: list[int], batch_size: int) -> int:
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_grouped_order_is_a_permutation_with_far_less_padding() -> None:
    rng = random.Random(0)
    lengths = [rng.choice([20, 25, 30]) if i % 2 else rng.randint(60, 200) for i in range(320)]
    sampler = SeededLengthGroupedSampler(lengths, batch_size=8, seed=42)
    order = list(sampler)
    assert sorted(order) == list(range(320)) and len(sampler) == 320
    shuffled = list(range(320))
    random.Random(1).shuffle(shuffled)
    assert _padded_tokens(order, lengths, 8) < 0.75 * _padded_tokens(shuffled, lengths, 8)
    assert _padded_tokens(order, lengths, 8) < 1.2 * sum(lengths)  # vs ~2x for the shuffle


def test_batches_are_transformers_groups_in_shuffled_order() -> None:
    """Not transformers' long-to-short sweep through each mega-batch (a curriculum that ends every epoch
    on the shortest pairs), but the same groups in random order; the longest first, a short one last."""
    lengths = [((i * 37) % 101 + 1) * LENGTH_BUCKET for i in range(101)]  # 101 buckets; 12 batches of 8, one of 5
    buckets = [n // LENGTH_BUCKET for n in lengths]
    grouped = get_length_grouped_indices(buckets, 8, generator=torch.Generator().manual_seed(3))
    order = length_grouped_order(lengths, 8, torch.Generator().manual_seed(3))
    batches = [order[i : i + 8] for i in range(0, 101, 8)]
    expected = [grouped[i : i + 8] for i in range(0, 101, 8)]
    assert sorted(map(sorted, batches)) == sorted(map(sorted, expected))
    assert lengths.index(101 * LENGTH_BUCKET) in batches[0] and len(batches[-1]) == 5 and batches[-1] == expected[-1]
    maxima = [max(lengths[i] for i in b) for b in batches[1:-1]]
    assert maxima != sorted(maxima, reverse=True) and batches != expected


def test_lengths_a_few_tokens_apart_are_not_sorted() -> None:
    """Within one bucket the shuffle stands: no batch is made of, say, one question template."""
    lengths = [20 + i % 8 for i in range(160)]  # 20..27 tokens: one bucket
    order = length_grouped_order(lengths, 8, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(160))
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in zip(*[iter(order)] * 8, strict=True)]
    assert sum(spreads) / len(spreads) > 4  # sorted by exact length, most batches would have spread 0


def test_order_depends_only_on_seed_and_epoch() -> None:
    lengths = list(range(1, 101))
    a = SeededLengthGroupedSampler(lengths, batch_size=4, seed=7)
    b = SeededLengthGroupedSampler(lengths, batch_size=4, seed=7)
    first = list(a)
    assert list(a) == first  # iterating again (the global RNG plays no part) repeats the epoch
    b.set_epoch(1)
    second_epoch = list(b)
    assert second_epoch != first
    a.set_epoch(1)
    assert list(a) == second_epoch  # a resumed run's sampler, told the epoch, gives the same order
    assert list(SeededLengthGroupedSampler(lengths, batch_size=4, seed=8)) != first


def test_eval_order_is_longest_first_and_stable() -> None:
    sampler = LongestFirstSampler([3, 9, 3, 7])
    assert list(sampler) == [1, 3, 0, 2] and len(sampler) == 4
