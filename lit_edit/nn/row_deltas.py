"""Per-row weight updates: every row of a batch runs the model with its own edited matrices.

``K`` independent single edits of the same matrices (FT's fine-tuned copies, MEND's updates) can
be evaluated in one forward: row ``b`` of a batch, owned by edit ``k_b``, computes each edited
layer as ``y_b = (W + D[k_b]) x_b = W x_b + D[k_b] x_b``. The shared ``W x`` is the layer's own
forward; :class:`RowDeltas` adds ``D[k_b] x_b`` with a forward hook. Everything else of the
model is shared. The result equals the one-by-one edited model's up to float rounding (``W x +
D x`` instead of ``(W + D) x``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lit_edit.nn.layout import MatrixLayout


class RowDeltas:
    """Stacked additive updates of some layers' weights, one per edit.

    Args:
        layers: Layer name → ``(layer, layout)`` (``nn.Linear`` or GPT-2 ``Conv1D``).
        deltas: Layer name → ``[K, *weight.shape]`` updates in the weight's storage layout
            (``[K, d_out, d_in]`` for ``nn.Linear``, ``[K, d_in, d_out]`` for ``Conv1D``).
    """

    def __init__(
        self,
        layers: Mapping[str, tuple[nn.Module, MatrixLayout]],
        deltas: Mapping[str, torch.Tensor],
    ) -> None:
        if set(layers) != set(deltas):
            raise ValueError(f"layers {sorted(layers)} and deltas {sorted(deltas)} differ")
        sizes = {int(d.shape[0]) for d in deltas.values()}
        if len(sizes) != 1:
            raise ValueError(f"every delta needs the same number of edits, got {sorted(sizes)}")
        self.layers = dict(layers)
        self.deltas = dict(deltas)
        self.n_edits = sizes.pop()

    def _hook(self, name: str, owners: torch.Tensor) -> Any:
        layout = self.layers[name][1]
        deltas = self.deltas[name]

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            """Add each row's own update: ``D[k_b] x_b``."""
            x = args[0]  # [B, L, d_in]
            if x.shape[0] != owners.shape[0]:
                raise RuntimeError(
                    f"layer {name!r} ran on {x.shape[0]} rows; the batch has "
                    f"{owners.shape[0]} owners"
                )
            d = deltas[owners.to(deltas.device)].to(x.dtype)  # [B, *weight shape]
            if layout.transposed:  # nn.Linear: d [B, d_out, d_in]
                extra = torch.einsum("bli,boi->blo", x, d)  # [B, L, d_out]
            else:  # Conv1D: d [B, d_in, d_out]
                extra = torch.einsum("bli,bio->blo", x, d)  # [B, L, d_out]
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
        handles = [
            module.register_forward_hook(self._hook(name, index))
            for name, (module, _) in self.layers.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
