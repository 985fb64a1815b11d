"""Length-bucketed batch sampling, shared by pretraining and alignment data loaders."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Dataset, DistributedSampler, Sampler


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


class BucketBatches(Dataset):
    """The batches of a :class:`LengthBucketSampler` as the items of a dataset.

    With several processes each rank loads whole batches of the one-process bucket order
    (a dataset of batches, ``batch_size=None``, sampled by :class:`BucketShareSampler`):
    Lightning cannot inject its distributed sampler into a custom batch sampler, and its own
    shuffle would be another order. Item ``i`` is batch ``i`` of the current epoch.

    Args:
        items: The samples.
        buckets: The one-process batch sampler (its epoch is set by the share sampler).
    """

    def __init__(self, items: Sequence[object], buckets: LengthBucketSampler) -> None:
        self.items = items
        self.buckets = buckets
        self._epoch: int | None = None
        self._batches: list[list[int]] = []

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches (index lists) of ``epoch``, computed once per epoch."""
        if self._epoch != epoch:
            self.buckets.set_epoch(epoch)
            self._batches = list(self.buckets)
            self._epoch = epoch
        return self._batches

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, i: int) -> list[object]:
        return [self.items[j] for j in self._batches[i]]


class BucketShareSampler(DistributedSampler):
    """This process's share of the one-process batch order: batches ``rank, rank + W, ...``.

    A ``DistributedSampler`` subclass (Lightning leaves it as it is and calls
    :meth:`set_epoch`); the order is cut to a multiple of the processes so that every process
    takes the same number of steps. Step ``k`` of ``W`` processes trains on the batches
    ``kW .. kW + W - 1`` of one process, which accumulating ``W`` batches trains on together.

    Args:
        batches: The dataset of batches.
        num_replicas: Number of processes.
        rank: This process's rank.
    """

    def __init__(self, batches: BucketBatches, num_replicas: int, rank: int) -> None:
        super().__init__(batches, num_replicas=num_replicas, rank=rank, shuffle=False,
                         drop_last=True)
        self.batches = batches

    def __iter__(self) -> Iterator[int]:
        self.batches.batches(self.epoch)  # [n_batches] index lists of this epoch
        return iter(range(self.rank, self.total_size, self.num_replicas))

