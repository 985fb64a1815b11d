"""Learning-rate schedules shared by the trainers (TinyFacts pretraining, LTE alignment)."""

from __future__ import annotations

import functools
import math

import torch


def warmup_cosine_factor(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``.

    Linear warm-up over ``warmup`` steps (``(step + 1) / warmup``), then cosine decay from 1 to
    ``floor`` over the remaining ``total - warmup`` steps, then ``floor``.

    Args:
        step: Optimizer step, from 0.
        warmup: Warm-up steps (0: none).
        total: Total optimizer steps.
        floor: Final multiplier.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, floor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step :class:`~torch.optim.lr_scheduler.LambdaLR` of :func:`warmup_cosine_factor`."""
    factor = functools.partial(warmup_cosine_factor, warmup=warmup, total=total, floor=floor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
