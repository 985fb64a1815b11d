"""The MEMIT family's shared core: edits spread over several layers, and their solves.

MEMIT (LOCATE_THEN_EDIT.md §3) and AlphaEdit (§5) write a batch of ``n`` facts into the MLP
output matrices ``W_l`` of layers ``l₁ < … < l_L``:

1. **Targets** ``z_i = h_i + δ_i``: the hidden state (block output) of the *last* edited layer at
   each fact's subject-last token, with ``δ`` optimised on the unedited model
   (:func:`~lit_edit.nn.locate.compute_values`, batched over facts).
2. For each layer ``l_j`` in ascending order (:func:`spread_updates`): the keys ``K_j`` on the
   current model (the layers below already edited; :func:`memit_keys`), the residual
   ``R = Z − H`` with ``H`` the current model's hidden state at ``l_L``, spread as
   ``R_j = R / (L − j + 1)`` (the remaining layers share the rest), an update ``ΔW_j`` from a
   solve, applied at once.

The solves, in float64, with ``ΔW`` as ``[d_out, d_in]`` (map it to the weight's storage with
:class:`~lit_edit.nn.layout.MatrixLayout`):

* MEMIT (:func:`memit_update`): ``ΔW = R Kᵀ (λ C + K_p K_pᵀ + K Kᵀ)⁻¹`` (``K_p``: keys of earlier
  sequential batches, when accumulated; ``memit_seq``);
* AlphaEdit (:func:`alphaedit_update`): with ``P`` the projector on the null space of the
  preserved keys' second moment (:func:`nullspace_projector`),
  ``ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹`` (paper eq. 14), which annihilates every key
  ``k`` with ``P k = 0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_edit.backbone import find_module, find_parameter
from lit_edit.editing import (
    CallbackHandle,
    CoveredEdit,
    EditHandle,
    HandleStack,
    restored_on_error,
)
from lit_edit.nn.fact_tokens import FactRequest, context_prefixes
from lit_edit.nn.layout import MatrixLayout, block_name, matrix_layout, mlp_out_name
from lit_edit.nn.locate import apply_matrix_update, compute_keys, compute_values


@dataclass(frozen=True)
class EditedMatrix:
    """One edited MLP output matrix.

    Attributes:
        name: Module name of its layer, e.g. ``"transformer.h.1.mlp.c_proj"``.
        module: The layer (its input is the key).
        weight: Its weight parameter.
        layout: The weight's storage layout.
    """

    name: str
    module: nn.Module
    weight: nn.Parameter
    layout: MatrixLayout


def edited_matrices(model: nn.Module, layers: Sequence[int], owner: str) -> list[EditedMatrix]:
    """The MLP output matrices of ``layers`` (ascending, distinct; negative counts from the end).

    Args:
        model: A model of a known architecture (:func:`~lit_edit.nn.layout.architectures`).
        layers: Block indices.
        owner: The editor (named in errors).

    Raises:
        ValueError: for no layer, or repeated or unsorted layers.
    """
    n_layers = int(model.config.num_hidden_layers)
    resolved = [i % n_layers for i in layers]
    if not resolved or resolved != sorted(set(resolved)):
        raise ValueError(f"{owner}: layers must be distinct and ascending, got {list(layers)}")
    out = []
    for layer in resolved:
        name = mlp_out_name(model, layer)
        module = find_module(model, name)
        weight_name = f"{name}.weight"
        out.append(EditedMatrix(name, module, find_parameter(model, weight_name),
                                matrix_layout(weight_name, module)))
    return out


def last_block(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """The block of the last edited layer (where the targets ``z`` live)."""
    return find_module(model, block_name(model, layers[-1]))


def memit_prefixes(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
    starts: Sequence[str] | None = None,
) -> list[str]:
    """MEMIT's context templates: ``"{}"`` and seeded generations of the unedited model.

    Args:
        model: The causal LM (unedited).
        tokenizer: Its tokenizer.
        lengths: ``(n_tokens, count)`` groups; default MEMIT's ``[(10, 5)]``; ``[]``: the bare
            prompt only.
        seed: Seed of the sampling.
        starts: Start texts, cycled; default MEMIT's ``The``, ``Therefore``, ``Because``, ``I``,
            ``You``; ``[]``: the BOS token alone.

    Returns:
        ``["{}", ...]`` (:func:`~lit_edit.nn.fact_tokens.context_prefixes`).
    """
    groups = [(10, 5)] if lengths is None else [(int(n), int(c)) for n, c in lengths]
    if not groups:
        return ["{}"]
    words = ["The", "Therefore", "Because", "I", "You"] if starts is None else list(starts)
    return context_prefixes(model, tokenizer, groups, seed=seed, starts=words or None)


def memit_keys(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    module: nn.Module,
    requests: Sequence[FactRequest],
    templates: Sequence[str],
) -> torch.Tensor:
    """MEMIT's keys: the bare prompt's key and the generated prefixes' mean key, averaged.

    MEMIT averages inside its two template groups ``["{}"]`` and the generated prefixes, then
    across them (§1.2): the bare prompt weighs 1/2. With ``templates == ["{}"]``, the bare key.

    Args:
        model: The causal LM.
        tokenizer: A fast tokenizer.
        module: The edited matrix's layer.
        requests: ``n`` facts.
        templates: ``"{}"`` first, then the generated prefixes.

    Returns:
        ``[n, d_in]`` keys (float32).
    """
    if not templates or templates[0] != "{}":
        raise ValueError("the first context template must be the bare prompt '{}'")
    bare = compute_keys(model, tokenizer, module, requests, ["{}"])  # [n, d_in]
    if len(templates) == 1:
        return bare
    prefixed = compute_keys(model, tokenizer, module, requests, templates[1:])  # [n, d_in]
    return (bare + prefixed) / 2


def memit_update(
    residual: torch.Tensor,
    keys: torch.Tensor,
    second_moment: torch.Tensor,
    mom2_weight: float,
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """MEMIT's least-squares update ``ΔW = R Kᵀ (λ C + K_p K_pᵀ + K Kᵀ)⁻¹`` (float64).

    The minimiser of ``λ N ‖ΔW K₀‖²/N + ‖ΔW K_p‖² + ‖(W + ΔW) K − V‖²`` with ``R = V − W K``
    (``C = K₀K₀ᵀ/N``), solved with ``linalg.solve`` (no explicit inverse).

    Args:
        residual: ``[n, d_out]`` the rows of ``R`` (what each key's value must gain).
        keys: ``[n, d_in]`` the keys ``K`` (rows).
        second_moment: ``[d_in, d_in]`` ``C``.
        mom2_weight: ``λ`` (``mom2_update_weight``).
        previous: ``[d_in, d_in]`` ``K_p K_pᵀ`` of earlier edits to preserve (or ``None``).

    Returns:
        ``[d_out, d_in]`` float64 ``ΔW``.
    """
    k = keys.double().T  # [d_in, n]
    system = mom2_weight * second_moment.double() + k @ k.T  # [d_in, d_in]
    if previous is not None:
        system = system + previous.double()
    return torch.linalg.solve(system, k @ residual.double()).T  # [d_out, d_in]


def nullspace_projector(
    second_moment: torch.Tensor, threshold: float, rule: str = "max"
) -> tuple[torch.Tensor, int]:
    """AlphaEdit's projector on the null space of the preserved keys, by a relative rule.

    ``P = Û Ûᵀ`` with ``Û`` the eigenvectors of ``C`` chosen by ``rule``:

    * ``"max"``: those whose eigenvalue is below ``threshold · λ_max(C)`` (upstream thresholds
      absolute eigenvalues at 2e-2, which depends on the model's activation scale; §9.3);
    * ``"energy"``: the most of the smallest ones whose eigenvalues sum to at most
      ``threshold · trace(C)``, so that the preserved keys keep at most that fraction of their
      energy in the null space (``E‖P k‖² ≤ threshold · E‖k‖²``), whatever the spectrum's
      outliers (GPT-2's few dominant dimensions make ``"max"`` keep most of the space).

    Args:
        second_moment: ``[d, d]`` symmetric positive semi-definite ``C``.
        threshold: Relative threshold (``0 < threshold``).
        rule: ``"max"`` or ``"energy"``.

    Returns:
        ``(P [d, d] float64, null-space dimension)``.
    """
    if threshold <= 0:
        raise ValueError(f"nullspace_threshold must be > 0, got {threshold}")
    values, vectors = torch.linalg.eigh(second_moment.double())  # ascending, [d], [d, d]
    if rule == "max":
        chosen = values < threshold * values.max()
    elif rule == "energy":
        chosen = values.clamp(min=0).cumsum(0) <= threshold * values.clamp(min=0).sum()
    else:
        raise ValueError(f"nullspace_rule must be 'max' or 'energy', got {rule!r}")
    kept = vectors[:, chosen]  # [d, q]
    return kept @ kept.T, int(kept.shape[1])


def alphaedit_update(
    residual: torch.Tensor,
    keys: torch.Tensor,
    projector: torch.Tensor,
    l2: float,
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """AlphaEdit's null-space update ``ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹`` (float64).

    Solved as the official code does: ``[P (K Kᵀ + K_p K_pᵀ) + α I] X = P K Rᵀ``, ``ΔW = Xᵀ``.
    Since ``P (A P + α I)⁻¹ = (P A P + α I)⁻¹ P``, ``ΔW k = 0`` for every ``k`` with ``P k = 0``.

    Args:
        residual: ``[n, d_out]`` rows of ``R``.
        keys: ``[n, d_in]`` rows of ``K``.
        projector: ``[d_in, d_in]`` ``P``.
        l2: ``α`` (``L2``).
        previous: ``[d_in, d_in]`` ``K_p K_pᵀ`` of earlier sequential edits (or ``None``).

    Returns:
        ``[d_out, d_in]`` float64 ``ΔW``.
    """
    k = keys.double().T  # [d_in, n]
    p = projector.double()
    gram = k @ k.T if previous is None else k @ k.T + previous.double()  # [d_in, d_in]
    system = p @ gram + l2 * torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    return torch.linalg.solve(system, p @ k @ residual.double()).T  # [d_out, d_in]


def spread_updates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[FactRequest],
    matrices: Sequence[EditedMatrix],
    block: nn.Module,
    templates: Sequence[str],
    targets: torch.Tensor,
    solve: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    write: Callable[[int, EditedMatrix, torch.Tensor], None] | None = None,
) -> list[torch.Tensor]:
    """MEMIT's step 2: one update per layer, ascending, each applied before the next layer.

    Args:
        model: The causal LM (its matrices are changed in place).
        tokenizer: A fast tokenizer.
        requests: ``n`` facts.
        matrices: The edited matrices, ascending.
        block: The block of the last edited layer (its output is where ``targets`` live).
        templates: Context templates of the keys (``"{}"`` first).
        targets: ``[n, d]`` target hidden states ``z``.
        solve: ``solve(j, residual [n, d_out], keys [n, d_in])`` → the update of matrix
            ``j`` (``[d_out, d_in]``, or whatever ``write`` takes).
        write: ``write(j, matrix, update)`` applies it (default: the whole matrix,
            :func:`~lit_edit.nn.locate.apply_matrix_update`; ECE: only its chosen units).

    Returns:
        The ``[d_out, d_in]`` update of each matrix, in order.
    """
    updates = []
    for j, matrix in enumerate(matrices):
        keys = memit_keys(model, tokenizer, matrix.module, requests, templates)  # [n, d_in]
        current = compute_keys(model, tokenizer, block, requests, ["{}"], read="output")  # [n, d]
        residual = (targets - current) / (len(matrices) - j)  # [n, d]
        update = solve(j, residual, keys)  # [d_out, d_in]
        if write is None:
            apply_matrix_update(matrix.weight, matrix.layout, update)
        else:
            write(j, matrix, update)
        updates.append(update)
    return updates


def spread_edit(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[FactRequest],
    matrices: Sequence[EditedMatrix],
    block: nn.Module,
    templates: Sequence[str],
    value_settings: dict[str, Any],
    handle: EditHandle,
    solve: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    edit_keys: EditKeys | None = None,
) -> EditHandle:
    """A whole MEMIT-family edit: targets, then :func:`spread_updates`, then the batch's keys.

    Args:
        model: The causal LM (its matrices are changed in place).
        tokenizer: A fast tokenizer.
        requests: ``n`` facts.
        matrices: The edited matrices, ascending.
        block: The block of the last edited layer.
        templates: Context templates (``"{}"`` first), of the targets and the keys.
        value_settings: Keyword arguments of :func:`~lit_edit.nn.locate.compute_values`.
        handle: The edit's weights handle, taken before any change (restored if the edit
            fails half-way, outside a sequence: :func:`~lit_edit.editing.restored_on_error`).
        solve: The per-matrix solve (see :func:`spread_updates`).
        edit_keys: Where the batch's keys (read on the edited model) are recorded for later
            batches, or ``None``.

    Returns:
        The edit's handle (also undoing the key record, if any).
    """
    with restored_on_error(handle):
        targets = compute_values(model, tokenizer, block, requests, templates,
                                 **value_settings).targets  # [n, d]
        spread_updates(model, tokenizer, requests, matrices, block, templates, targets, solve)
    if edit_keys is None:
        return handle
    keys = [memit_keys(model, tokenizer, m.module, requests, templates)
            for m in matrices]  # on the edited model
    return edit_keys.record(handle, keys)


class EditKeys:
    """Keys of the earlier batches of a sequence, per edited matrix (``K_p``; ``cache_c``).

    Kept as the key matrices of each batch (not a running ``Σ K Kᵀ``), so that undoing a batch
    (its edit handle) is exact: the batch's entry is dropped.
    """

    def __init__(self) -> None:
        self._batches: list[list[torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self._batches)

    def push(self, keys: list[torch.Tensor]) -> None:
        """Add one batch: its ``[n, d_in]`` keys per matrix (on the post-edit model)."""
        self._batches.append(keys)

    def pop(self) -> None:
        """Drop the newest batch."""
        self._batches.pop()

    def record(self, handle: EditHandle, keys: list[torch.Tensor]) -> EditHandle:
        """Push one batch's keys; the edit's handle, now also undoing the push.

        Args:
            handle: The handle of the batch's weight change (a
                :class:`~lit_edit.editing.WeightsHandle`, or inside an edit sequence a
                :class:`~lit_edit.editing.CoveredEdit`).
            keys: The batch's ``[n, d_in]`` keys per matrix.

        Returns:
            A handle restoring the weights and dropping the keys. Inside a sequence the
            key drop is pushed on the sequence (restored with it, after the edits above it).
        """
        self.push(keys)
        undo = CallbackHandle(self.pop)
        if isinstance(handle, CoveredEdit):
            handle.sequence.push(undo)
            return handle
        return HandleStack([handle, undo])

    def gram(self, j: int) -> torch.Tensor | None:
        """``K_p K_pᵀ`` (``[d_in, d_in]`` float64) of matrix ``j`` over the batches, or ``None``."""
        if not self._batches:
            return None
        k = torch.cat([batch[j] for batch in self._batches]).double()  # [Σn, d_in]
        return k.T @ k
