"""ROME (Meng et al., NeurIPS 2022): rank-one model editing of one MLP output matrix."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_edit.backbone import Backbone, find_module, find_parameter
from lit_edit.editing import EditHandle
from lit_edit.methods.base import EditorModule
from lit_edit.nn.corpus_moments import CorpusMoments
from lit_edit.nn.fact_tokens import context_prefixes, requests_of
from lit_edit.nn.layout import matrix_layout, mlp_out_name
from lit_edit.nn.locate import (
    apply_matrix_update,
    check_value_settings,
    compute_keys,
    compute_values,
    rank_one_update,
)
from lit_edit.records import EditRecord


class ROMEEditor(EditorModule):
    """ROME: write one fact into the MLP output matrix ``W`` of one block, in closed form.

    For the edit ``(prompt, subject, target_new)``:

    1. **Key** ``k*``: the input of ``W`` at the subject's last token, averaged over the bare
       prompt and context prefixes generated once (seeded) from the unedited model.
    2. **Value**: a shift ``δ`` of ``W``'s output at that token, optimised (Adam) so that the
       model predicts ``target_new`` after every prefixed prompt, with a KL term keeping the
       next-token distribution of ``"{subject} is a"``, a norm penalty and a norm clamp
       (:func:`~lit_edit.nn.locate.compute_values`).
    3. **Rank-one update** ``ΔW = δ uᵀ / (uᵀ k*)`` with ``u = C⁻¹ k*`` (``C = E[k kᵀ]``, the
       second moment of ``W``'s inputs over a text corpus, cached by
       :class:`~lit_edit.nn.layer_stats.LayerStatsCache`), so ``(W + ΔW) k* = W k* + δ``.

    ROME takes one edit at a time (:attr:`max_edits_per_call` = 1): the batch protocol refuses
    it; the sequential protocol applies edits one after another. The handle restores ``W``
    bit-exactly, and nothing else changes.

    Deviations, each a flag: ``key_mismatch=False`` (default) uses the averaged key ``k*`` in
    both ``u`` and the denominator (the r-ROME fix, LOCATE_THEN_EDIT.md §2.5); ``True`` is the
    original ROME, whose denominator uses the bare prompt's key. ``mom2_exclude_subject`` takes
    every corpus text mentioning the edited subject out of ``C`` (exactly, by subtraction), so
    that, on TinyFacts, where the corpus is the model's own pretraining text, the statistic holds
    no sentence about the fact being edited (§9.4).

    Args:
        backbone: Model to edit (see :class:`~lit_edit.methods.base.EditorModule`).
        layer: Block whose MLP output matrix is edited (negative counts from the end).
        steps: Most Adam steps of the value optimisation (``v_num_grad_steps``).
        lr: Adam learning rate of ``δ`` (``v_lr``).
        weight_decay: Weight of the ``‖δ‖ / ‖h₀‖²`` penalty (``v_weight_decay``).
        clamp_norm_factor: ``‖δ‖ ≤ clamp_norm_factor · ‖h₀‖``.
        kl_factor: Weight of the KL term on the essence prompt.
        kl_prompt: The essence prompt, ``{}`` standing for the subject.
        stop_below: The value optimisation stops once its loss is below this.
        prefix_lengths: Context prefixes: ``[n_tokens, count]`` groups generated from the
            unedited model (ROME: ``[[5, 10], [10, 10]]``); ``[]`` for the bare prompt only.
        prefix_seed: Seed of the prefix sampling.
        prefix_starts: Start texts of the generations (cycled); default: the BOS token alone.
        mom2_adjustment: Weigh the update by ``C⁻¹`` (``False``: ``u = k*``, EasyEdit's default).
        mom2_corpus: ``"world"`` (the pretraining text of the TinyFacts backbone's world), a
            ``.txt`` (one document per line), ``.jsonl`` (``{"text": ...}`` per line) or
            ``.parquet`` file, or a hub dataset ``hf://ORG/NAME[:CONFIG]:SPLIT`` (split slices
            such as ``train[:100000]`` allowed; read by ``datasets``, its ``text`` column).
        mom2_max_tokens: Token budget of ``C``.
        mom2_max_length: Each document is truncated to this many tokens.
        mom2_batch_size: Documents per forward pass when computing ``C``.
        mom2_exclude_subject: Take the corpus texts that mention the edited subject out of
            ``C`` (needs the whole corpus within ``mom2_max_tokens``).
        key_mismatch: Original ROME's denominator (bare-prompt key) instead of the averaged one.
        stats_dir: Directory of the statistics cache (default ``~/.cache/lit_edit/layer_stats``).
    """

    max_edits_per_call = 1

    def __init__(
        self,
        backbone: Backbone | str = "tinyfacts",
        layer: int = 0,
        steps: int = 20,
        lr: float = 0.5,
        weight_decay: float = 0.5,
        clamp_norm_factor: float = 4.0,
        kl_factor: float = 0.0625,
        kl_prompt: str = "{} is a",
        stop_below: float = 5e-2,
        prefix_lengths: list[tuple[int, int]] | None = None,
        prefix_seed: int = 0,
        prefix_starts: list[str] | None = None,
        mom2_adjustment: bool = True,
        mom2_corpus: str = "world",
        mom2_max_tokens: int = 1_000_000,
        mom2_max_length: int = 128,
        mom2_batch_size: int = 16,
        mom2_exclude_subject: bool = True,
        key_mismatch: bool = False,
        stats_dir: str | None = None,
    ) -> None:
        super().__init__(backbone)
        check_value_settings("ROMEEditor", steps, kl_prompt)
        self.layer_name = mlp_out_name(self.model, layer)
        self.weight_name = f"{self.layer_name}.weight"
        # held in a plain dict: an attribute would register them a second time in state_dict
        self._edited = {"weight": find_parameter(self.model, self.weight_name),
                        "layer": find_module(self.model, self.layer_name)}
        self.layout = matrix_layout(self.weight_name, self._edited["layer"])
        self._factor: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.steps = steps
        self.lr = lr
        self.weight_decay = weight_decay
        self.clamp_norm_factor = clamp_norm_factor
        self.kl_factor = kl_factor
        self.kl_prompt = kl_prompt
        self.stop_below = stop_below
        self.mom2_adjustment = mom2_adjustment
        self.mom2_exclude_subject = mom2_exclude_subject
        self.key_mismatch = key_mismatch
        self.moments = CorpusMoments(self.model, self.tokenizer, self.backbone.name, mom2_corpus,
                                     mom2_max_tokens, mom2_max_length, mom2_batch_size, stats_dir)
        lengths = [(5, 10), (10, 10)] if prefix_lengths is None else prefix_lengths
        # from the unedited model, once (seeded): every later edit uses the same templates
        self.templates = context_prefixes(self.model, self.tokenizer,
                                          [tuple(x) for x in lengths], seed=prefix_seed,
                                          starts=prefix_starts)

    def edit_state_keys(self) -> set[str]:
        """The edited matrix (an edit changes nothing else)."""
        return {f"model.{self.weight_name}"}

    # ------------------------------------------------------------------ statistics
    def corpus(self) -> list[str]:
        """The texts ``C`` is computed over (read once)."""
        return self.moments.texts()

    def second_moment(self) -> tuple[torch.Tensor, int]:
        """``(C, n_tokens)`` of the edited matrix's inputs over the corpus (cached on disk).

        Computed on first use, i.e. at the first edit, from the weights as they are then (the
        unedited ones: every protocol's first edit starts from them); the cache key holds those
        weights' fingerprint, so other weights never share the file.
        """
        return self.moments.moment(self.layer_name)

    def moment_factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The LU factorisation of ``C`` (float64), computed once: every edit's ``C⁻¹ k``."""
        moment = self.second_moment()[0]
        if self._factor is None or self._factor[0] is not moment:
            self._factor = (moment, torch.linalg.lu_factor(moment.double()))
        return self._factor[1]

    def moment_for(self, subject: str) -> torch.Tensor:
        """``C`` for an edit of ``subject``: without the corpus texts naming it, if asked."""
        if not self.mom2_exclude_subject:
            return self.second_moment()[0]
        return self.moments.moment_without_subjects(self.layer_name, [subject], "ROMEEditor")

    # ------------------------------------------------------------------ editing
    def edit(self, records: Sequence[EditRecord]) -> EditHandle:
        """Write the record's new target into the edited matrix (one record).

        Args:
            records: Exactly one record with a ``subject`` occurring in its prompt.

        Returns:
            A handle restoring the matrix bit-exactly (inside an edit sequence, restored
            with the sequence: :meth:`~lit_edit.methods.base.EditorModule.weights_handle`).

        Raises:
            ValueError: for more than one record, or a record without a usable subject.
        """
        if len(records) != 1:
            raise ValueError(f"ROMEEditor applies one edit at a time, got {len(records)}")
        request = requests_of(records, lambda r: f"record {r.index} of {r.source!r}")
        moment = self.moment_for(request[0].subject) if self.mom2_adjustment else None
        weight, layer = self._edited["weight"], self._edited["layer"]
        key = compute_keys(self.model, self.tokenizer, layer, request, self.templates)[0]
        values = compute_values(
            self.model, self.tokenizer, layer, request, self.templates,
            kl_prompt=self.kl_prompt, steps=self.steps, lr=self.lr,
            weight_decay=self.weight_decay, clamp_norm_factor=self.clamp_norm_factor,
            kl_factor=self.kl_factor, stop_below=self.stop_below,
        )
        # one C for every edit (no subject taken out): factorised once
        factor = self.moment_factor() if moment is not None and not self.mom2_exclude_subject \
            else None
        if self.key_mismatch:  # original ROME: u from k*, denominator from the bare prompt
            bare = compute_keys(self.model, self.tokenizer, layer, request, ["{}"])[0]
            update = rank_one_update(bare, values.delta[0], moment, direction_key=key,
                                     factor=factor)
        else:
            update = rank_one_update(key, values.delta[0], moment, factor=factor)  # [d_out, d_in]
        handle = self.weights_handle([weight])
        apply_matrix_update(weight, self.layout, update)
        return handle
