"""Seeded, reproducible splitting and subsampling of record lists.

Both use :class:`random.Random`, whose shuffles and samples are stable across Python versions and
platforms for a given seed, and return indices in ascending order (file order is kept).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Split ``range(n)`` into disjoint train/val/test index lists that cover it.

    The validation and test sizes are ``round(fraction * n)``; train gets the rest.

    Args:
        n: Number of items.
        val_fraction: Fraction for validation, in ``[0, 1]``.
        test_fraction: Fraction for test, in ``[0, 1]``; ``val_fraction + test_fraction <= 1``.
        seed: Seed of the permutation.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each sorted.

    Raises:
        ValueError: if a fraction is outside ``[0, 1]`` or they sum to more than 1.
    """
    check_fractions(val_fraction, test_fraction)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = min(round(test_fraction * n), n)
    n_val = min(round(val_fraction * n), n - n_test)
    return {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test : n_test + n_val]),
        "train": sorted(order[n_test + n_val :]),
    }


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Check split fractions.

    Raises:
        ValueError: if a fraction is outside ``[0, 1]`` or they sum to more than 1.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if val_fraction + test_fraction > 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be at most 1, got {val_fraction} + {test_fraction}"
        )


def subsample(
    items: Sequence[T], limit: int | None, seed: int, name: str, mode: str = "seeded"
) -> list[T]:
    """Keep at most ``limit`` items, in their original order: a seeded random subset or the first.

    Args:
        items: The items.
        limit: Maximum number kept; ``None`` keeps everything.
        seed: Seed; combined with ``name`` so different splits draw different subsets.
        name: Name of the split (e.g. ``"train"``).
        mode: ``"seeded"`` (a seeded random subset) or ``"first"`` (the first ``limit`` items,
            as ``ds[:N]`` in EasyEdit's scripts; ``seed`` is not used).

    Returns:
        The kept items (all of them when ``limit`` is ``None`` or not smaller than their number).

    Raises:
        ValueError: if ``limit`` is negative or ``mode`` unknown.
    """
    if mode not in ("seeded", "first"):
        raise ValueError(f"the subsample mode must be 'seeded' or 'first', got {mode!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"the record limit must be >= 0, got {limit}")
    if limit is None or limit >= len(items):
        return list(items)
    if mode == "first":
        return list(items[:limit])
    kept = random.Random(f"{seed}:{name}").sample(range(len(items)), limit)
    return [items[i] for i in sorted(kept)]
