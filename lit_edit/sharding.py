"""Sharding evaluation records across processes: disjoint, contiguous, nothing padded.

Lightning's default for a multi-process ``test`` is torch's ``DistributedSampler``, which pads
the records to a multiple of the number of processes (some records are scored twice) and deals
them out round-robin (a batch of edits is split across processes). An editing evaluation needs
neither: :class:`ShardSampler` gives each process one contiguous slice of the records, every
record exactly once, with slice boundaries on multiples of an indivisible ``unit`` (the
protocol's group of edits that must be applied together), so that every group is the one a
single process would form. Gathering the processes' results in rank order gives back the
records' original order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist
from torch.utils.data import DistributedSampler


class ShardingError(ValueError):
    """Records that cannot be shared by the processes of a run as asked (one line suffices)."""


def world_and_rank() -> tuple[int, int]:
    """The number of processes of the default process group and this process's rank.

    Returns:
        ``(world_size, rank)``; ``(1, 0)`` without an initialised process group.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def shard_bounds(n: int, world_size: int, rank: int, unit: int = 1) -> tuple[int, int]:
    """The contiguous slice ``[start, stop)`` of ``n`` records that process ``rank`` evaluates.

    The records form ``ceil(n / unit)`` units of ``unit`` consecutive records (the last one may
    be shorter); each process gets a contiguous run of whole units, the last
    ``n_units % world_size`` processes one unit more than the others (the short last unit goes
    with an extra one, which balances the records best). The slices of
    ``rank = 0 .. world_size - 1`` are disjoint, in order, and cover every record once.

    Args:
        n: Number of records.
        world_size: Number of processes.
        rank: This process's rank, in ``[0, world_size)``.
        unit: Records that must stay on one process (e.g. a batch of edits applied together).

    Returns:
        ``(start, stop)`` with ``start`` a multiple of ``unit``.

    Raises:
        ValueError: for a bad argument.
        ShardingError: when there are fewer units than processes (a process without records
            would leave the others waiting for it); the message says how many devices the
            records allow.
    """
    if n < 0:
        raise ValueError(f"the number of records must be >= 0, got {n}")
    if unit < 1:
        raise ValueError(f"the shard unit must be >= 1, got {unit}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} process(es)")
    if world_size == 1:
        return 0, n
    n_units = -(-n // unit)
    if n_units < world_size:
        what = (
            f"{n} test record(s) in {n_units} group(s) of {unit} (the editing protocol's groups, "
            "each evaluated whole by one process)" if unit > 1 else f"{n} test record(s)"
        )
        allowed = (
            "--trainer.devices 1" if n_units <= 1 else f"--trainer.devices {n_units} or fewer"
        )
        raise ShardingError(
            f"{what} cannot be shared by {world_size} processes: every process needs at least "
            f"one; use {allowed}, or more test records"
        )
    base, extra = divmod(n_units, world_size)
    plain = world_size - extra  # the first ranks get `base` units, the others one more
    first = rank * base + max(0, rank - plain)
    last = first + base + (1 if rank >= plain else 0)
    return first * unit, min(last * unit, n)


class ShardSampler(DistributedSampler):
    """This process's contiguous slice of a dataset's indices (see :func:`shard_bounds`).

    A :class:`~torch.utils.data.DistributedSampler` subclass, so that Lightning
    (``use_distributed_sampler``) does not wrap it in its own padding sampler. The process count
    and rank are read from the default process group when the sampler is iterated (unless given),
    so a data module can build it before the processes are started. In one process it yields
    ``0 .. n - 1``, like a sequential sampler.

    Args:
        n: Number of records of the dataset.
        unit: Records that must stay on one process (slice boundaries are multiples of it).
        num_replicas: Number of processes (default: the process group's).
        rank: This process's rank (default: the process group's).
    """

    def __init__(
        self, n: int, unit: int = 1, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        # DistributedSampler.__init__ is not called: it needs the process group at once
        self.n = n
        self.unit = unit
        self._num_replicas = num_replicas
        self._rank = rank
        self.shuffle = False
        self.drop_last = False
        self.seed = 0
        self.epoch = 0

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        """Number of processes the records are shared by."""
        return self._num_replicas if self._num_replicas is not None else world_and_rank()[0]

    @property
    def rank(self) -> int:  # type: ignore[override]
        """This process's rank."""
        return self._rank if self._rank is not None else world_and_rank()[1]

    def bounds(self) -> tuple[int, int]:
        """This process's slice ``[start, stop)`` of the indices."""
        return shard_bounds(self.n, self.num_replicas, self.rank, self.unit)

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        """Indices this process yields."""
        start, stop = self.bounds()
        return stop - start

    @property
    def total_size(self) -> int:  # type: ignore[override]
        """Indices over all processes (the dataset's length: nothing is padded)."""
        return self.n

    def __iter__(self) -> Iterator[int]:
        """This process's indices, in order."""
        start, stop = self.bounds()
        return iter(range(start, stop))

    def __len__(self) -> int:
        """Number of indices this process yields."""
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Recorded for Lightning's sake; the slice does not depend on it."""
        self.epoch = epoch
