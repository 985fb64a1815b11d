"""What the editors on MEMIT's pipeline (MEMIT, AlphaEdit, ECE) share: a mixin, no method's file."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_edit.nn.corpus_moments import CorpusMoments
from lit_edit.nn.fact_tokens import FactRequest
from lit_edit.nn.memit_solve import EditKeys, edited_matrices, last_block, memit_prefixes


class MemitFamily:
    """The parts of an editor built on MEMIT's pipeline (``lit_edit.nn.memit_solve``).

    A mixin placed before :class:`~lit_edit.methods.base.EditorModule` in an editor's bases
    (``class MEMITEditor(MemitFamily, EditorModule)``): it uses the editor's ``model``,
    ``tokenizer`` and ``backbone``. Editors call :meth:`setup_family` from their ``__init__``
    (after their own checks) with the settings every member has; they keep their own signature
    (it is the CLI's help).
    """

    def setup_family(
        self,
        layers: list[int] | None,
        value_settings: dict[str, object],
        prefixes: tuple[list[tuple[int, int]] | None, int, list[str] | None],
        corpus: tuple[str, int, int, int, str | None],
        mom2_exclude_subject: bool,
        accumulate_keys: bool,
    ) -> None:
        """Resolve the edited matrices and set up ``C``, the key templates and the batch keys.

        Args:
            layers: Blocks whose MLP output matrices are edited (default ``[0, 1]``).
            value_settings: Keyword arguments of :func:`~lit_edit.nn.locate.compute_values`.
            prefixes: ``(prefix_lengths, prefix_seed, prefix_starts)`` of the key templates,
                sampled once from the unedited model (seeded).
            corpus: ``(mom2_corpus, mom2_max_tokens, mom2_max_length, mom2_batch_size,
                stats_dir)`` of :class:`~lit_edit.nn.corpus_moments.CorpusMoments`.
            mom2_exclude_subject: Take the texts naming a batch's subjects out of ``C``.
            accumulate_keys: Keep the keys of earlier batches in the solve.
        """
        owner = type(self).__name__
        self.layers = [0, 1] if layers is None else list(layers)
        self.matrices = edited_matrices(self.model, self.layers, owner)
        self._block = {"block": last_block(self.model, self.layers)}  # not a second submodule
        self.value_settings = dict(value_settings)
        self.mom2_exclude_subject = mom2_exclude_subject
        self.accumulate_keys = accumulate_keys
        self.moments = CorpusMoments(self.model, self.tokenizer, self.backbone.name, *corpus)
        # from the unedited model, once (seeded): every later edit uses the same templates
        self.templates = memit_prefixes(self.model, self.tokenizer, *prefixes)
        self.edit_keys = EditKeys()

    def edit_state_keys(self) -> set[str]:
        """The edited matrices (an edit changes nothing else)."""
        return {f"model.{m.name}.weight" for m in self.matrices}

    def batch_moments(self, requests: Sequence[FactRequest]) -> list[torch.Tensor]:
        """``C`` of each edited matrix for a batch (without the texts naming its subjects)."""
        if not self.mom2_exclude_subject:
            return [self.moments.moment(m.name)[0] for m in self.matrices]
        return self.moments.moments_without_subjects(
            [m.name for m in self.matrices], [r.subject for r in requests], type(self).__name__)
