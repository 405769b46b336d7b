"""Length-grouped batching for preference pairs (less padding, same examples per epoch).

TRL's collator pads every row of a batch (prompt + chosen and prompt + rejected of each pair) to the
batch's longest row, so a batch that mixes a 20-token pair with a 200-token one computes ~10x the
tokens it trains on. transformers' ``train_sampling_strategy="group_by_length"`` fixes that with
``LengthGroupedSampler`` (shuffle, cut into mega-batches of up to 50 batches, sort each by length), but
as shipped it neither works for TRL's preference datasets (it looks for an ``input_ids`` column) nor
resumes exactly (it draws its permutation from the global torch RNG, whose state at an epoch's start
differs between an uninterrupted and a resumed run). ``SeededLengthGroupedSampler`` takes the lengths
from the pair columns and seeds each epoch's permutation with ``seed + epoch``, like accelerate's
``SeedableRandomSampler`` does for the default random order, and shuffles the batches it forms (see
``length_grouped_order``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pyarrow.compute as pc
import torch
from datasets import Dataset
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
LENGTH_BUCKET = 32
"""Training batches group pairs by their length in steps of this many tokens (see ``length_grouped_order``)."""


def pair_lengths(dataset: Dataset, max_length: int | None) -> list[int]:
    """Padded width each pair needs: prompt + the longer reply, cut at ``max_length`` (TRL's collator)."""
    table = dataset.select_columns(list(PAIR_COLUMNS)).with_format("arrow")[:]
    prompt, chosen, rejected = (pc.list_value_length(table[name]).fill_null(0) for name in PAIR_COLUMNS)
    widths = pc.add(prompt, pc.max_element_wise(chosen, rejected))
    if max_length is not None:
        widths = pc.min_element_wise(widths, max_length)
    return [int(w) for w in widths.to_pylist()]


class SeededLengthGroupedSampler(Sampler[int]):
    """``LengthGroupedSampler`` whose order depends only on ``seed`` and the epoch (see module doc)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate's data loader) before each epoch, resumed ones included."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(length_grouped_order(self.lengths, self.batch_size, generator))


def length_grouped_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """transformers' grouping (shuffle, mega-batches sorted by length, the longest batch first, so an
    out-of-memory shows at step 1) on lengths rounded up to ``LENGTH_BUCKET`` tokens, then the batches
    themselves shuffled.

    Two changes to what transformers does, both so that grouping changes how much is padded and nothing
    else. transformers keeps each mega-batch in descending order, so every stretch of ~50 steps runs from
    the longest pairs to the shortest and an epoch ends on the shortest ones: a curriculum, which on the
    varlen benchmark left a visibly different adapter (full-data loss 0.50 vs 0.36-0.42 for TRL's
    shuffle); shuffled batches keep the padding saving without the order. And exact lengths sort pairs by
    whatever decides a few tokens (on the demo data: the question template), so each batch held one kind
    of question, and the adapter came out worse in all three seeds tried (0.022-0.041 against
    0.012-0.025 for seven seeds of TRL's shuffle); pairs within one bucket keep their random order (the
    sort is stable), and a few pad tokens cost next to nothing.
    A short last batch stays last so every other batch lines up with the data loader's.
    """
    buckets = [-(-n // LENGTH_BUCKET) for n in lengths]
    order = get_length_grouped_indices(buckets, batch_size, generator=generator)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) < 3:
        return order
    head, middle = batches[0], batches[1:]
    tail = [middle.pop()] if len(middle[-1]) < batch_size else []
    shuffled = [middle[i] for i in torch.randperm(len(middle), generator=generator).tolist()]
    return [i for batch in [head, *shuffled, *tail] for i in batch]


class LongestFirstSampler(Sampler[int]):
    """Evaluation and reference-scoring order: longest pairs first, so each batch holds pairs of similar
    length (deterministic; nothing is trained on this order, so exact lengths are fine)."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)
