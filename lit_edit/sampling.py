"""Length-bucketed batch sampling, shared by pretraining and alignment data loaders."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


class LengthBucketSampler(Sampler[list[int]]):
    """Seeded batches of sequences of similar length (less padding), in a random order.

    Sequences are shuffled, cut into chunks of 32 batches, sorted by length inside a chunk,
    batched, and the batches shuffled. Epoch ``e`` uses seed ``seed + e``: each pass counts one
    epoch on, and :meth:`set_epoch` (which Lightning calls before every training epoch) sets it,
    so a resumed run orders its epoch as the uninterrupted run did.

    Args:
        lengths: A length (any unit) per sequence.
        batch_size: Sequences per batch.
        seed: Seed of the order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        chunk = self.batch_size * 32
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            group = sorted(order[start : start + chunk], key=self.lengths.__getitem__)
            size = self.batch_size
            batches += [group[i : i + size] for i in range(0, len(group), size)]
        rng.shuffle(batches)
        return iter(batches)

    def set_epoch(self, epoch: int) -> None:
        """Order the next pass as epoch ``epoch`` (seed ``seed + epoch``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        chunk = self.batch_size * 32
        n = len(self.lengths)
        return sum(math.ceil(min(chunk, n - s) / self.batch_size) for s in range(0, n, chunk))
