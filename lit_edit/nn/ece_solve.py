"""ECE's restricted solves: MEMIT / AlphaEdit updates that only write chosen key coordinates.

For an MLP output matrix ``W`` (``[d_out, d_k]`` as a map) and a set ``S`` of its input units
(LOCATE_THEN_EDIT.md §7.3 item 3), the update is constrained to ``ΔW[:, i] = 0`` for ``i ∉ S``.
Since ``ΔW k = ΔW_S k_S``, the constrained least-squares problems are the unconstrained ones
on the principal sub-blocks:

* MEMIT (:func:`restricted_memit_update`):
  ``ΔW_S = R K_Sᵀ (λ C_SS + K_{p,S} K_{p,S}ᵀ + K_S K_Sᵀ)⁻¹``;
* AlphaEdit (:func:`restricted_alphaedit_update`): ``P_S`` the projector on the null space of
  ``C_SS`` (the preserved keys restricted to ``S``; ``ΔW_S P_S = ΔW_S`` then leaves every
  preserved key's output unchanged), and eq. 14 on the sub-blocks.

With ``S`` every unit both equal the full solves of :mod:`lit_edit.nn.memit_solve`.
:func:`apply_columns` adds ``ΔW_S`` to the selected units only (the other entries of the weight
are not touched, so they stay bit-identical); it is the ``write`` of MEMIT's per-layer loop
(:func:`~lit_edit.nn.memit_solve.spread_updates`) for ECE.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_edit.nn.layout import MatrixLayout
from lit_edit.nn.memit_solve import (
    alphaedit_update,
    memit_update,
    nullspace_projector,
)


def _block(matrix: torch.Tensor | None, selected: torch.Tensor) -> torch.Tensor | None:
    """The principal sub-block ``M[S][:, S]`` (or ``None``)."""
    if matrix is None:
        return None
    idx = selected.to(matrix.device)
    return matrix.index_select(0, idx).index_select(1, idx)


def restricted_memit_update(
    residual: torch.Tensor,
    keys: torch.Tensor,
    selected: torch.Tensor,
    second_moment: torch.Tensor,
    mom2_weight: float,
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """MEMIT's least-squares update constrained to the units ``S`` (float64).

    Args:
        residual: ``[n, d_out]`` rows of ``R``.
        keys: ``[n, d_k]`` rows of ``K``.
        selected: ``[s]`` ascending indices of ``S``.
        second_moment: ``[d_k, d_k]`` ``C``.
        mom2_weight: ``λ``.
        previous: ``[d_k, d_k]`` ``K_p K_pᵀ`` of earlier edits (or ``None``).

    Returns:
        ``[d_out, s]`` ``ΔW_S`` (the columns of ``ΔW`` at ``S``; all others are zero).
    """
    k = keys.index_select(1, selected.to(keys.device))  # [n, s]
    return memit_update(residual, k, _block(second_moment, selected), mom2_weight,
                        _block(previous, selected))


def restricted_alphaedit_update(
    residual: torch.Tensor,
    keys: torch.Tensor,
    selected: torch.Tensor,
    second_moment: torch.Tensor,
    threshold: float,
    rule: str,
    l2: float,
    previous: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """AlphaEdit's null-space update constrained to the units ``S`` (float64).

    Args:
        residual: ``[n, d_out]`` rows of ``R``.
        keys: ``[n, d_k]`` rows of ``K``.
        selected: ``[s]`` ascending indices of ``S``.
        second_moment: ``[d_k, d_k]`` ``C`` (its sub-block ``C_SS`` sets the null space).
        threshold: Relative null-space threshold
            (:func:`~lit_edit.nn.memit_solve.nullspace_projector`).
        rule: ``"max"`` or ``"energy"``.
        l2: ``α``.
        previous: ``[d_k, d_k]`` ``K_p K_pᵀ`` of earlier edits (or ``None``).

    Returns:
        ``([d_out, s] ΔW_S, null-space dimension within S)``.
    """
    projector, dim = nullspace_projector(_block(second_moment, selected), threshold, rule)
    k = keys.index_select(1, selected.to(keys.device))  # [n, s]
    return alphaedit_update(residual, k, projector, l2, _block(previous, selected)), dim


def apply_columns(
    weight: nn.Parameter, layout: MatrixLayout, selected: torch.Tensor, update: torch.Tensor
) -> None:
    """Add ``ΔW_S`` (``[d_out, s]``) to the units ``S`` of ``weight`` only (in place).

    The entries of the other units are not written (bit-identical, whatever their value).

    Args:
        weight: The matrix parameter (Conv1D ``[d_k, d_out]``: rows; Linear ``[d_out, d_k]``:
            columns).
        layout: Its layout.
        selected: ``[s]`` indices of ``S``.
        update: ``[d_out, s]``.
    """
    idx = selected.to(weight.device)
    with torch.no_grad():
        if layout.transposed:  # nn.Linear [d_out, d_k]
            weight.index_add_(1, idx, update.to(weight.dtype))
        else:  # Conv1D [d_k, d_out]
            weight.index_add_(0, idx, update.T.to(weight.dtype))
