"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's edits projected on the preserved keys' null space."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch

from lit_edit.backbone import Backbone
from lit_edit.editing import EditHandle
from lit_edit.locate_family import MemitFamily
from lit_edit.methods.base import EditorModule
from lit_edit.nn.fact_tokens import FactRequest, requests_of
from lit_edit.nn.locate import check_value_settings
from lit_edit.nn.memit_solve import (
    EditKeys,
    alphaedit_update,
    nullspace_projector,
    spread_edit,
)
from lit_edit.records import EditRecord

log = logging.getLogger(__name__)


class AlphaEditEditor(MemitFamily, EditorModule):
    """AlphaEdit: MEMIT whose updates cannot move the outputs of the preserved keys.

    The pipeline is MEMIT's (:class:`~lit_edit.methods.memit.MEMITEditor`,
    :mod:`lit_edit.nn.memit_solve`: targets at the last edited layer, keys per layer, residual
    spread over the layers); only the solve differs (LOCATE_THEN_EDIT.md §5). Per edited
    matrix, ``P`` projects on the null space of the preserved keys: the eigenvectors of their
    second moment ``C = E[k kᵀ]`` whose eigenvalue is below ``nullspace_threshold · λ_max(C)``
    (a *relative* rule: upstream's absolute 2e-2 depends on the model's activation scale,
    §9.3), or (``nullspace_rule: energy``) the smallest eigenvalues holding at most that
    fraction of ``trace(C)``. The update (paper eq. 14)

    ``ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹``

    leaves ``ΔW k = 0`` for every key with ``P k = 0``. ``K_p`` are the keys of the earlier
    batches of a sequence (upstream's ``cache_c``), read on the model after their batch; the
    batch protocol restores them with the weights, so every batch starts from none. ``C`` has
    no weight of its own in the update (upstream's ``mom2_update_weight`` is unused).

    The null-space dimension of each matrix is logged and, with how much of the edit keys lies
    in it (``‖P k‖ / ‖k‖``, §9.4), joins every record's values in ``records.jsonl``.

    Args:
        backbone: Model to edit (see :class:`~lit_edit.methods.base.EditorModule`).
        layers: Blocks whose MLP output matrices are edited, ascending (negative counts from
            the end); the targets live at the last one.
        nullspace_threshold: Relative threshold of the null space.
        nullspace_rule: ``"max"`` (eigenvalues below ``nullspace_threshold · λ_max``) or
            ``"energy"`` (the smallest eigenvalues summing to at most
            ``nullspace_threshold · trace(C)``; see
            :func:`~lit_edit.nn.memit_solve.nullspace_projector`).
        l2: ``α``, the ridge of the solve (``L2``; upstream 10).
        steps: Most Adam steps of the target optimisation (``v_num_grad_steps``).
        lr: Adam learning rate of ``δ`` (``v_lr``).
        weight_decay: Weight of the ``‖δ‖ / ‖h‖²`` penalty (``v_weight_decay``).
        clamp_norm_factor: ``‖δ‖ ≤ clamp_norm_factor · ‖h‖`` (upstream: 0.75).
        kl_factor: Weight of the KL term on the essence prompt.
        kl_prompt: The essence prompt, ``{}`` standing for the subject.
        stop_below: A fact's target optimisation stops once its loss is below this.
        prefix_lengths: Context prefixes: ``[n_tokens, count]`` groups generated from the
            unedited model (upstream: ``[[10, 5]]``); ``[]`` for the bare prompt only.
        prefix_seed: Seed of the prefix sampling.
        prefix_starts: Start texts of the generations, cycled (upstream: ``The``,
            ``Therefore``, ``Because``, ``I``, ``You``); ``[]``: the BOS token alone.
        mom2_corpus: ``"world"`` (the pretraining text of the TinyFacts backbone's world), a
            ``.txt`` (one document per line), ``.jsonl`` (``{"text": ...}`` per line) or
            ``.parquet`` file, or a hub dataset ``hf://ORG/NAME[:CONFIG]:SPLIT`` (split slices
            such as ``train[:100000]`` allowed; read by ``datasets``, its ``text`` column).
        mom2_max_tokens: Token budget of each ``C``.
        mom2_max_length: Each document is truncated to this many tokens.
        mom2_batch_size: Documents per forward pass when computing ``C``.
        mom2_exclude_subject: Take the corpus texts naming an edited subject out of ``C``
            (needs the whole corpus within ``mom2_max_tokens``; ``P`` is then computed per
            batch, else once per matrix).
        accumulate_keys: Keep the earlier batches' keys in the solve (``K_p``; AlphaEdit: on).
        stats_dir: Directory of the statistics cache (default ``~/.cache/lit_edit/layer_stats``).
    """

    def __init__(
        self,
        backbone: Backbone | str = "tinyfacts",
        layers: list[int] | None = None,
        nullspace_threshold: float = 1e-2,
        nullspace_rule: Literal["max", "energy"] = "max",
        l2: float = 10.0,
        steps: int = 20,
        lr: float = 0.5,
        weight_decay: float = 0.5,
        clamp_norm_factor: float = 0.75,
        kl_factor: float = 0.0625,
        kl_prompt: str = "{} is a",
        stop_below: float = 5e-2,
        prefix_lengths: list[tuple[int, int]] | None = None,
        prefix_seed: int = 0,
        prefix_starts: list[str] | None = None,
        mom2_corpus: str = "world",
        mom2_max_tokens: int = 1_000_000,
        mom2_max_length: int = 128,
        mom2_batch_size: int = 16,
        mom2_exclude_subject: bool = True,
        accumulate_keys: bool = True,
        stats_dir: str | None = None,
    ) -> None:
        super().__init__(backbone)
        check_value_settings(type(self).__name__, steps, kl_prompt)
        if nullspace_rule not in ("max", "energy"):
            raise ValueError(f"AlphaEditEditor: nullspace_rule must be 'max' or 'energy', got "
                             f"{nullspace_rule!r}")
        if nullspace_threshold <= 0 or l2 < 0:
            raise ValueError(f"AlphaEditEditor: nullspace_threshold must be > 0 and l2 >= 0, "
                             f"got {nullspace_threshold} and {l2}")
        self.setup_family(
            layers,
            {"kl_prompt": kl_prompt, "steps": steps, "lr": lr, "weight_decay": weight_decay,
             "clamp_norm_factor": clamp_norm_factor, "kl_factor": kl_factor,
             "stop_below": stop_below},
            (prefix_lengths, prefix_seed, prefix_starts),
            (mom2_corpus, mom2_max_tokens, mom2_max_length, mom2_batch_size, stats_dir),
            mom2_exclude_subject, accumulate_keys,
        )
        self.nullspace_threshold = nullspace_threshold
        self.nullspace_rule = nullspace_rule
        self.l2 = l2
        self._projectors: dict[str, tuple[torch.Tensor, int]] = {}
        self._record_values: dict[tuple[str, int], dict[str, float]] = {}

    def projectors(self, requests: Sequence[FactRequest]) -> list[tuple[torch.Tensor, int]]:
        """``(P, null-space dimension)`` of each edited matrix for a batch.

        With ``mom2_exclude_subject``, from ``C`` without the texts naming the batch's subjects
        (per batch); otherwise once per matrix.
        """
        if self.mom2_exclude_subject:
            subjects = [r.subject for r in requests]
            return [nullspace_projector(
                self.moments.moment_without_subjects(m.name, subjects, type(self).__name__),
                self.nullspace_threshold, self.nullspace_rule) for m in self.matrices]
        for m in self.matrices:
            if m.name not in self._projectors:
                self._projectors[m.name] = nullspace_projector(
                    self.moments.moment(m.name)[0], self.nullspace_threshold,
                    self.nullspace_rule)
        return [self._projectors[m.name] for m in self.matrices]

    def edit(self, records: Sequence[EditRecord]) -> EditHandle:
        """Write the records' new targets into the edited matrices, all at once.

        Args:
            records: One or more records, each with a ``subject`` occurring in its prompt.

        Returns:
            A handle restoring the matrices (and the earlier-batch keys) bit-exactly; inside an
            edit sequence, restored with the sequence.

        Raises:
            ValueError: for a record without a usable subject.
        """
        requests = requests_of(records, lambda r: f"record {r.index} of {r.source!r}")
        projectors = self.projectors(requests)
        handle = self.weights_handle([m.weight for m in self.matrices])
        previous = self.edit_keys if self.accumulate_keys else EditKeys()
        values: dict[str, float] = {}

        def solve(j: int, residual: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            """AlphaEdit's null-space update of matrix ``j``."""
            projector, dim = projectors[j]
            k = keys.double()  # [n, d_in]
            inside = ((k @ projector).norm(dim=-1) / k.norm(dim=-1).clamp(min=1e-12)).mean()
            name = self.matrices[j].name
            values[f"nullspace_dim/{name}"] = float(dim)
            values[f"key_in_nullspace/{name}"] = float(inside)
            log.info("AlphaEdit %s: null space %d of %d, mean ‖Pk‖/‖k‖ of the edit keys %.3f",
                     name, dim, projector.shape[0], float(inside))
            return alphaedit_update(residual, keys, projector, self.l2, previous.gram(j))

        edited = spread_edit(self.model, self.tokenizer, requests, self.matrices,
                             self._block["block"], self.templates, self.value_settings, handle,
                             solve, self.edit_keys if self.accumulate_keys else None)
        for record in records:
            self._record_values[(record.source, record.index)] = values
        return edited

    def record_values(self, records: Sequence[EditRecord]) -> list[dict[str, float | None]]:
        """Per record: the null-space dimension of each matrix and ``‖P k‖ / ‖k‖`` at its edit."""
        return [dict(self._record_values.get((r.source, r.index), {})) for r in records]
