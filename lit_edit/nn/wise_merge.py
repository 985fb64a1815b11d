"""Ties merging of WISE's side-memory shards, through peft's merge utilities.

A shard is a copy ``W_i`` of the value matrix trained on one block of edits; its *task vector* is
``τ_i = W_i - W_v`` (``W_v`` the original weights). Ties (Yadav et al., 2023) merges task
vectors in three steps: **trim** each to its ``density`` largest-magnitude entries, **elect** a
sign per entry (the sign of the summed weighted, trimmed vectors), and take the **disjoint
mean** of the entries that agree with the elected sign. Trimming and sign election are peft's
(``peft.utils.merge_utils.prune`` and ``calculate_majority_sign_mask``); nothing of Ties is
rewritten here.

Two normalisations of the disjoint mean exist, a flag (:data:`TiesNormalisation`):

* ``"weights"`` (WISE's code, after mergekit): ``Σ_i w_i τ_i m_i / Σ_i w_i m_i`` with ``m_i``
  the agreement mask: the weighted mean of the agreeing entries (with equal weights, the plain
  mean of the agreeing entries whatever the weights' scale).
* ``"count"`` (``peft.utils.merge_utils.ties`` as is): ``Σ_i w_i τ_i m_i / Σ_i m_i``, divided
  by the *number* of agreeing entries; with WISE's weights ``1/k`` it shrinks the merged
  vector by another factor ``k``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch

TiesNormalisation = Literal["weights", "count"]


def ties_merge(
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    normalise: TiesNormalisation = "weights",
) -> torch.Tensor:
    """Ties-merge task vectors (see the module docstring).

    Args:
        task_vectors: ``k`` tensors of one shape (``W_i - W_v``).
        weights: ``k`` merge weights (WISE: ``1/k`` each; re-merges: ``0.4/k`` per new shard
            and ``0.6`` for the merged memory).
        density: Fraction of entries each task vector keeps in the trim step (WISE: 0.53).
        normalise: ``"weights"`` (WISE's code) or ``"count"`` (peft's ``ties``).

    Returns:
        The merged task vector (same shape and dtype as the inputs).

    Raises:
        ValueError: on no task vectors, mismatched lengths or shapes, a density outside
            ``(0, 1]`` or an unknown normalisation.
    """
    from peft.utils.merge_utils import calculate_majority_sign_mask, prune, ties

    if not task_vectors:
        raise ValueError("ties_merge needs at least one task vector")
    if len(weights) != len(task_vectors):
        raise ValueError(f"{len(weights)} weights for {len(task_vectors)} task vectors")
    if len({tuple(t.shape) for t in task_vectors}) != 1:
        shapes = [tuple(t.shape) for t in task_vectors]
        raise ValueError(f"task vectors of different shapes: {shapes}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if normalise not in ("weights", "count"):
        raise ValueError(f"normalise must be 'weights' or 'count', got {normalise!r}")
    dtype = task_vectors[0].dtype
    vectors = [t.detach().float() for t in task_vectors]
    w = torch.tensor(list(weights), dtype=torch.float32, device=vectors[0].device)
    if normalise == "count":
        with warnings.catch_warnings():  # density 1: peft warns that it keeps every entry
            warnings.simplefilter("ignore", UserWarning)
            return ties(vectors, w, density).to(dtype)
    trimmed = torch.stack(
        [t if density >= 1.0 else prune(t, density, method="magnitude") for t in vectors]
    )  # [k, *shape]
    shape = (-1,) + (1,) * (trimmed.dim() - 1)
    weighted = trimmed * w.view(shape)  # [k, *shape]
    agree = calculate_majority_sign_mask(weighted, method="total")  # [k, *shape] bool
    total = (weighted * agree).sum(0)
    divisor = (w.view(shape) * agree).sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (total / divisor).to(dtype)
