"""The single-process training order, dealt out to the processes of a multi-process run.

One process iterates a shuffled, seeded DataLoader: per pass, the loader draws its workers'
base seed from its generator, then the random sampler draws a permutation (and a second one,
cut to nothing, when the pass ends). Lightning's default for more processes is torch's
``DistributedSampler`` with its own permutation (seeded by the global seed and the epoch), so a
2-process run trains on other records in other steps than one process accumulating the same
global batch. :class:`GlobalOrderSampler` replays the one-process draws instead and gives rank
``r`` positions ``r, r + W, r + 2W, ...`` of that order: step ``k`` of ``W`` processes holds the
records of the ``W`` consecutive one-process batches ``kW .. kW + W - 1`` (with batch size 1 per
process, or whole batches of ``W × B`` records per step when accumulating ``W`` batches of ``B``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


def one_process_order(n: int, seed: int, epoch: int) -> list[int]:
    """The positions a one-process shuffled loader yields in pass ``epoch``.

    The loader has ``shuffle=True`` and a generator seeded ``seed``; ``epoch`` is 0-based, every
    earlier pass having run to its end.

    Args:
        n: Number of records.
        seed: Seed of the loader's generator (the data module's ``shuffle_seed``).
        epoch: The pass.

    Returns:
        The permutation of ``range(n)`` of that pass.
    """
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(epoch + 1):
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the base seed
        order = torch.randperm(n, generator=generator).tolist()
        torch.randperm(n, generator=generator)  # the sampler's remainder draw at the pass end
    return order


class GlobalOrderSampler(DistributedSampler):
    """This process's share of the one-process training order (see the module docstring).

    A ``DistributedSampler`` subclass, so Lightning neither replaces nor re-wraps it; it calls
    :meth:`set_epoch` before every pass. The order is padded like ``DistributedSampler``'s (the
    first positions repeated) so every process takes the same number of steps.

    Args:
        n: Number of training records.
        seed: The data module's ``shuffle_seed``.
        num_replicas: Number of processes (default: the process group's).
        rank: This process's rank (default: the process group's).
    """

    def __init__(
        self, n: int, seed: int, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed, drop_last=False)
        self.n = n

    def __iter__(self) -> Iterator[int]:
        order = one_process_order(self.n, self.seed, self.epoch)
        order += order[: self.total_size - len(order)]  # pad to a multiple of the processes
        return iter(order[self.rank : self.total_size : self.num_replicas])
