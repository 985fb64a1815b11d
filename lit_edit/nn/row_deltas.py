"""Per-row weight updates: every row of a batch runs the model with its own edited matrices.

``K`` independent single edits of the same matrices (FT's fine-tuned copies, MEND's updates) can
be evaluated in one forward: row ``b`` of a batch, owned by edit ``k_b``, computes each edited
layer as ``y_b = (W + D[k_b]) x_b = W x_b + D[k_b] x_b``. The shared ``W x`` is the layer's own
forward; :class:`RowDeltas` adds ``D[k_b] x_b`` with a forward hook, as one batched product per
edit over that edit's rows (the rows are grouped, never the ``[B, *W.shape]`` updates gathered
per row). Everything else of the model is shared. The result equals the one-by-one edited
model's up to float rounding (``W x + D x`` instead of ``(W + D) x``).

An update of low rank (MEND's: a sum over the edit's tokens of outer products) can be given as
:class:`LowRank` factors; its rows then cost ``r (d_in + d_out)`` instead of ``d_in d_out``
multiply-adds per token, and it is expanded to the dense stack only where that is cheaper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_edit.nn.layout import MatrixLayout


@dataclass(frozen=True)
class LowRank:
    """``K`` updates in factored form: edit ``k`` adds ``(x Lₖᵀ) Rₖ`` to a row ``x``'s output.

    The dense update is ``Lₖᵀ Rₖ`` (``[d_in, d_out]``, Conv1D's layout) or ``Rₖᵀ Lₖ``
    (``[d_out, d_in]``, ``nn.Linear``'s); zero factor rows pad edits of lower rank.

    Attributes:
        left: ``[K, r, d_in]`` input-side factors.
        right: ``[K, r, d_out]`` output-side factors.
    """

    left: torch.Tensor
    right: torch.Tensor

    def __post_init__(self) -> None:
        if self.left.dim() != 3 or self.right.dim() != 3 or (
                self.left.shape[:2] != self.right.shape[:2]):
            raise ValueError(f"LowRank needs left [K, r, d_in] and right [K, r, d_out], got "
                             f"{tuple(self.left.shape)} and {tuple(self.right.shape)}")

    def cheaper_dense(self) -> bool:
        """Whether the dense ``d_in · d_out`` product costs no more than the two factored ones."""
        r, d_in, d_out = self.left.shape[1], self.left.shape[2], self.right.shape[2]
        return r * (d_in + d_out) >= d_in * d_out

    def dense(self, transposed: bool) -> torch.Tensor:
        """The dense stack: ``[K, d_out, d_in]`` if ``transposed`` else ``[K, d_in, d_out]``."""
        if transposed:
            return torch.bmm(self.right.transpose(1, 2), self.left)
        return torch.bmm(self.left.transpose(1, 2), self.right)


@dataclass(frozen=True)
class _Groups:
    """The rows of a batch grouped by their edit: row ``b`` sits at ``(group[b], slot[b])``.

    Attributes:
        edits: ``[G]`` the distinct edits of the batch, ascending.
        group: ``[B]`` the index in ``edits`` of each row's edit.
        slot: ``[B]`` each row's place among the rows of its edit.
        width: The most rows of one edit (``c``).
        all_edits: Whether ``edits`` is every edit ``0 … K-1``.
    """

    edits: torch.Tensor
    group: torch.Tensor
    slot: torch.Tensor
    width: int
    all_edits: bool

    @staticmethod
    def of(owners: torch.Tensor, n_edits: int) -> _Groups:
        """Group ``owners`` (``[B]`` edit indices) of ``n_edits`` edits."""
        edits, group, counts = torch.unique(owners, return_inverse=True, return_counts=True)
        order = torch.argsort(group, stable=True)  # rows sorted by group
        starts = torch.cumsum(counts, 0) - counts  # [G] first sorted position of each group
        slot = torch.empty_like(group)
        slot[order] = torch.arange(group.shape[0]) - starts[group[order]]
        width = int(counts.max()) if counts.numel() else 0
        return _Groups(edits, group, slot, width, edits.shape[0] == n_edits)


class RowDeltas:
    """Stacked additive updates of some layers' weights, one per edit.

    Args:
        layers: Layer name → ``(layer, layout)`` (``nn.Linear`` or GPT-2 ``Conv1D``).
        deltas: Layer name → ``[K, *weight.shape]`` updates in the weight's storage layout
            (``[K, d_out, d_in]`` for ``nn.Linear``, ``[K, d_in, d_out]`` for ``Conv1D``), or
            their :class:`LowRank` factors (kept factored only where that is cheaper).
    """

    def __init__(
        self,
        layers: Mapping[str, tuple[nn.Module, MatrixLayout]],
        deltas: Mapping[str, torch.Tensor | LowRank],
    ) -> None:
        if set(layers) != set(deltas):
            raise ValueError(f"layers {sorted(layers)} and deltas {sorted(deltas)} differ")
        self.layers = dict(layers)
        self.deltas: dict[str, torch.Tensor | LowRank] = {
            name: d.dense(self.layers[name][1].transposed)
            if isinstance(d, LowRank) and d.cheaper_dense() else d
            for name, d in deltas.items()
        }
        sizes = {int((d.left if isinstance(d, LowRank) else d).shape[0])
                 for d in self.deltas.values()}
        if len(sizes) != 1:
            raise ValueError(f"every delta needs the same number of edits, got {sorted(sizes)}")
        self.n_edits = sizes.pop()

    def _hook(self, name: str, groups: _Groups) -> Any:
        layout = self.layers[name][1]
        d = self.deltas[name]
        if not groups.all_edits:  # the updates of the edits present in the batch
            if isinstance(d, LowRank):
                present = groups.edits.to(d.left.device)
                d = LowRank(d.left[present], d.right[present])
            else:
                d = d[groups.edits.to(d.device)]

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            """Add each row's own update ``D[k_b] x_b``: one batched product per edit."""
            x = args[0]  # [B, L, d_in]
            if x.shape[0] != groups.group.shape[0]:
                raise RuntimeError(
                    f"layer {name!r} ran on {x.shape[0]} rows; the batch has "
                    f"{groups.group.shape[0]} owners"
                )
            b, length, d_in = x.shape
            g, c = groups.edits.shape[0], groups.width
            grouped = x.new_zeros(g, c, length, d_in)  # row b at (its edit's group, its slot)
            grouped[groups.group, groups.slot] = x
            flat = grouped.view(g, c * length, d_in)
            if isinstance(d, LowRank):
                mid = torch.bmm(flat, d.left.to(x.dtype).transpose(1, 2))  # [G, c·L, r]
                extra = torch.bmm(mid, d.right.to(x.dtype))  # [G, c·L, d_out]
            else:
                w = d.to(x.dtype)  # [G, *weight shape]
                if layout.transposed:  # nn.Linear: w [G, d_out, d_in]
                    w = w.transpose(1, 2)
                extra = torch.bmm(flat, w)  # [G, c·L, d_out]
            extra = extra.view(g, c, length, -1)[groups.group, groups.slot]  # [B, L, d_out]
            return output + extra

        return hook

    @contextlib.contextmanager
    def rows(self, owners: Sequence[int]) -> Iterator[None]:
        """Run the block's forwards with row ``b`` under edit ``owners[b]``.

        Args:
            owners: One edit index (``0 <= k < K``) per row of the batch.
        """
        index = torch.as_tensor(list(owners), dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n_edits):
            raise ValueError(f"owners must be in [0, {self.n_edits}), got {sorted(set(owners))}")
        groups = _Groups.of(index, self.n_edits)
        handles = [
            module.register_forward_hook(self._hook(name, groups))
            for name, (module, _) in self.layers.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
