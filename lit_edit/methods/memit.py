"""MEMIT (Meng et al., ICLR 2023): mass editing, a batch of facts spread over several layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_edit.backbone import Backbone
from lit_edit.editing import EditHandle
from lit_edit.locate_family import MemitFamily
from lit_edit.methods.base import EditorModule
from lit_edit.nn.fact_tokens import requests_of
from lit_edit.nn.locate import check_value_settings
from lit_edit.nn.memit_solve import (
    EditKeys,
    memit_update,
    spread_edit,
)
from lit_edit.records import EditRecord


class MEMITEditor(MemitFamily, EditorModule):
    """MEMIT: write a batch of facts into the MLP output matrices of several blocks.

    For ``n`` edits ``(prompt, subject, target_new)`` and layers ``l₁ < … < l_L``
    (LOCATE_THEN_EDIT.md §3; :mod:`lit_edit.nn.memit_solve`):

    1. **Targets** ``z_i = h_i + δ_i`` at the output of block ``l_L`` (the residual stream) at
       each subject's last token, ``δ`` optimised for all facts in one batched loop on the
       unedited model (:func:`~lit_edit.nn.locate.compute_values`: NLL of the new target after
       every context prefix, KL on ``"{subject} is a"``, norm penalty, clamp
       ``‖δ_i‖ ≤ clamp_norm_factor · ‖h_i‖``).
    2. For each layer ``l_j``, ascending: keys ``K_j`` (inputs of the MLP output matrix at the
       subject's last token, the bare prompt weighing 1/2 against the prefixes' mean) on the
       current model; residual ``R = Z − H`` at ``l_L`` on the current model, spread
       ``R_j = R / (L − j + 1)``; the least-squares update in float64
       ``ΔW_j = R_j K_jᵀ (λ C_j + K_j K_jᵀ)⁻¹`` (``C_j = E[k kᵀ]`` over a text corpus, cached on
       disk by weights, layer, corpus and token count), applied before the next layer.

    Any number of records per call (batch protocol); the single and sequential protocols work
    too. The handle restores the edited matrices bit-exactly, and nothing else changes.

    Options: ``accumulate_keys`` adds the keys of the earlier batches of a sequence to the
    solve, ``(λ C + K_p K_pᵀ + K Kᵀ)`` (``memit_seq`` of the NSE/AlphaEdit forks), so that
    later batches preserve earlier edits too (off: the original MEMIT). ``mom2_exclude_subject``
    takes every corpus text naming an edited subject out of ``C`` (exactly), for corpora that
    contain the facts being edited (TinyFacts' pretraining text, §9.4).

    Args:
        backbone: Model to edit (see :class:`~lit_edit.methods.base.EditorModule`).
        layers: Blocks whose MLP output matrices are edited, ascending (negative counts from
            the end); the targets live at the last one.
        mom2_update_weight: ``λ``, the weight of the preservation term ``λ C``.
        steps: Most Adam steps of the target optimisation (``v_num_grad_steps``).
        lr: Adam learning rate of ``δ`` (``v_lr``).
        weight_decay: Weight of the ``‖δ‖ / ‖h‖²`` penalty (``v_weight_decay``).
        clamp_norm_factor: ``‖δ‖ ≤ clamp_norm_factor · ‖h‖`` (MEMIT: 0.75).
        kl_factor: Weight of the KL term on the essence prompt.
        kl_prompt: The essence prompt, ``{}`` standing for the subject.
        stop_below: A fact's target optimisation stops once its loss is below this.
        prefix_lengths: Context prefixes: ``[n_tokens, count]`` groups generated from the
            unedited model (MEMIT: ``[[10, 5]]``); ``[]`` for the bare prompt only.
        prefix_seed: Seed of the prefix sampling.
        prefix_starts: Start texts of the generations, cycled (MEMIT: ``The``, ``Therefore``,
            ``Because``, ``I``, ``You``); ``[]``: the BOS token alone.
        mom2_corpus: ``"world"`` (the pretraining text of the TinyFacts backbone's world), a
            ``.txt`` (one document per line), ``.jsonl`` (``{"text": ...}`` per line) or
            ``.parquet`` file, or a hub dataset ``hf://ORG/NAME[:CONFIG]:SPLIT`` (split slices
            such as ``train[:100000]`` allowed; read by ``datasets``, its ``text`` column).
        mom2_max_tokens: Token budget of each ``C``.
        mom2_max_length: Each document is truncated to this many tokens.
        mom2_batch_size: Documents per forward pass when computing ``C``.
        mom2_exclude_subject: Take the corpus texts naming an edited subject out of ``C``
            (needs the whole corpus within ``mom2_max_tokens``).
        accumulate_keys: Preserve the keys of earlier batches of a sequence (``memit_seq``).
        stats_dir: Directory of the statistics cache (default ``~/.cache/lit_edit/layer_stats``).
    """

    def __init__(
        self,
        backbone: Backbone | str = "tinyfacts",
        layers: list[int] | None = None,
        mom2_update_weight: float = 20000.0,
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
        accumulate_keys: bool = False,
        stats_dir: str | None = None,
    ) -> None:
        super().__init__(backbone)
        check_value_settings(type(self).__name__, steps, kl_prompt)
        if mom2_update_weight < 0:
            raise ValueError(f"MEMITEditor: mom2_update_weight must be >= 0, got "
                             f"{mom2_update_weight}")
        self.setup_family(
            layers,
            {"kl_prompt": kl_prompt, "steps": steps, "lr": lr, "weight_decay": weight_decay,
             "clamp_norm_factor": clamp_norm_factor, "kl_factor": kl_factor,
             "stop_below": stop_below},
            (prefix_lengths, prefix_seed, prefix_starts),
            (mom2_corpus, mom2_max_tokens, mom2_max_length, mom2_batch_size, stats_dir),
            mom2_exclude_subject, accumulate_keys,
        )
        self.mom2_update_weight = mom2_update_weight

    def edit(self, records: Sequence[EditRecord]) -> EditHandle:
        """Write the records' new targets into the edited matrices, all at once.

        Args:
            records: One or more records, each with a ``subject`` occurring in its prompt.

        Returns:
            A handle restoring the matrices bit-exactly (inside an edit sequence, restored
            with the sequence: :meth:`~lit_edit.methods.base.EditorModule.weights_handle`).

        Raises:
            ValueError: for a record without a usable subject.
        """
        requests = requests_of(records, lambda r: f"record {r.index} of {r.source!r}")
        moments = self.batch_moments(requests)
        handle = self.weights_handle([m.weight for m in self.matrices])
        previous = self.edit_keys if self.accumulate_keys else EditKeys()

        def solve(j: int, residual: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            """MEMIT's least-squares update of matrix ``j``."""
            return memit_update(residual, keys, moments[j], self.mom2_update_weight,
                                previous.gram(j))

        return spread_edit(self.model, self.tokenizer, requests, self.matrices,
                           self._block["block"], self.templates, self.value_settings, handle,
                           solve, self.edit_keys if self.accumulate_keys else None)
