"""WISE's activation distance and its three-part routing margin loss.

The router compares the value layer's output through a side memory ``W'`` with its output
through the original weights ``W_v``, per token, then per sequence (mean over the real tokens).
Two definitions exist (METHODS.md §4.2, pitfall P9), a flag (:data:`DistanceKind`):

* ``"delta"`` (the paper's Δ_act): ``‖A(x)(W' - W_v)‖₂ = ‖o' - o‖₂``, with ``A(x)`` the FFN
  activations (the value matrix's input) and ``o' = A(x) W'``, ``o = A(x) W_v`` (the bias
  cancels);
* ``"activated"`` (the peer's code): ``‖σ(o') - σ(o)‖₂``, with ``σ`` the model's hidden
  activation (GELU-new for GPT-2, SiLU for LLaMA) applied to the layer *outputs*.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

DistanceKind = Literal["delta", "activated"]


def token_distance(
    side: torch.Tensor,
    original: torch.Tensor,
    kind: DistanceKind,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-token activation distance of a side memory's output from the original output.

    Args:
        side: ``[B, L, d_out]`` the layer's output through the side memory.
        original: ``[B, L, d_out]`` its output through the original weights.
        kind: ``"delta"`` (paper) or ``"activated"`` (peer).
        activation: ``σ`` for ``"activated"``.

    Returns:
        ``[B, L]`` distances (float32).

    Raises:
        ValueError: on an unknown kind, or ``"activated"`` without an activation.
    """
    if kind == "delta":
        diff = side.float() - original.float()
    elif kind == "activated":
        if activation is None:
            raise ValueError("distance 'activated' needs the model's activation function")
        diff = activation(side.float()) - activation(original.float())
    else:
        raise ValueError(f"distance must be 'delta' or 'activated', got {kind!r}")
    return diff.norm(dim=-1)  # [B, L]


def sequence_distance(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token distances over each row's real tokens.

    Args:
        tokens: ``[B, L]`` per-token distances.
        mask: ``[B, L]`` with 1 on real tokens (``None``: every token counts).

    Returns:
        ``[B]``.
    """
    if mask is None:
        return tokens.mean(-1)
    m = mask.to(tokens.dtype)
    return (tokens * m).sum(-1) / m.sum(-1).clamp(min=1)


def positive_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries of ``x`` (0 when none is positive): WISE's ``mean⁺``."""
    positive = x[x > 0]
    return positive.mean() if positive.numel() else x.new_zeros(())


def margin_loss(
    inside: torch.Tensor, outside: torch.Tensor, alpha: float, beta: float, gamma: float
) -> torch.Tensor:
    """WISE's routing loss ``L_a`` (paper Eq. 5, in its code's form).

    ``mean⁺(out - in + γ) + mean⁺(out - α) + mean⁺(β - in)``, every (out, in) pair in the first
    term: out-of-scope rows must stay below ``α``, the edit rows above ``β``, and the edit rows
    at least ``γ`` above every out-of-scope row.

    Args:
        inside: ``[E]`` sequence distances of the edit rows.
        outside: ``[O]`` sequence distances of the out-of-scope rows.
        alpha: Upper margin of out-of-scope distances.
        beta: Lower margin of in-scope distances.
        gamma: Least gap between in- and out-of-scope distances.

    Returns:
        A scalar.
    """
    gap = outside[:, None] - inside[None, :] + gamma  # [O, E]
    return positive_mean(gap) + positive_mean(outside - alpha) + positive_mean(beta - inside)
