"""Small seeded matrices for the solve tests of the MEMIT family (MEMIT, AlphaEdit, ECE)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def seeded(seed: int = 0) -> torch.Generator:
    """A seeded generator (one torch thread: the solves' figures do not depend on the load)."""
    torch.set_num_threads(1)
    return torch.Generator().manual_seed(seed)


def random_layer(kind: str, d_in: int, d_out: int, g: torch.Generator) -> nn.Module:
    """An ``nn.Linear`` (``kind == "linear"``) or GPT-2 ``Conv1D`` with random weights."""
    layer = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
    return layer
