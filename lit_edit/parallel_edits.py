"""Views of ``K`` independent single edits in effect at once (``editor.ParallelEdits``).

Two kinds cover the methods: :class:`RowDeltaEdits` for editors that change weight matrices
(each batch row runs with its own record's updated matrices, :class:`~lit_edit.nn.row_deltas.
RowDeltas`), and :class:`PromptEdits` for editors that put the edit in the prompt (each query
gets its own record's fact). Both score through the editor's scorer, so values equal the
one-by-one protocol's (up to float rounding for weight updates).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lit_edit.nn.row_deltas import RowDeltas
from lit_edit.records import EditRecord, QAPair
from lit_edit.scoring import GeneratedAnswer, Generation, PairScore


class _View:
    """Restore bookkeeping shared by the views (an optional undo; idempotent)."""

    def __init__(self, undo: Callable[[], None] | None = None) -> None:
        self._undo = undo
        self.restored = False

    def restore(self) -> None:
        """Undo the edits (idempotent)."""
        if not self.restored:
            if self._undo is not None:
                self._undo()
            self.restored = True

    def __enter__(self) -> _View:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def record_values(self, records: Sequence[EditRecord]) -> list[dict[str, float | None]]:
        """No method-specific values."""
        return [{} for _ in records]


class RowDeltaEdits(_View):
    """Weight edits: pair ``i`` is scored with the matrices of edit ``owners[i]``.

    Args:
        editor: The editor (its ``model``, ``tokenizer`` and ``evaluation.scorer()``).
        deltas: The stacked updates of the ``K`` edits.
        undo: Called on restore (nothing is changed in the model itself: ``None``).
    """

    def __init__(self, editor: Any, deltas: RowDeltas, undo: Callable[[], None] | None = None):
        super().__init__(undo)
        self.editor = editor
        self.deltas = deltas

    def score_pairs(self, pairs: Sequence[QAPair], owners: Sequence[int]) -> list[PairScore]:
        """Teacher-forced scores, each row with its own edit's matrices."""
        e = self.editor
        return e.evaluation.scorer().score(e.model, e.tokenizer, pairs, owners, self.deltas.rows)

    def generate_answers(
        self, pairs: Sequence[QAPair], owners: Sequence[int]
    ) -> list[GeneratedAnswer]:
        """Greedy answers, each row with its own edit's matrices."""
        e = self.editor
        return e.evaluation.scorer().generate_answers(
            e.model, e.tokenizer, pairs, owners, self.deltas.rows
        )

    def sample(
        self, prompts: Sequence[str], max_length: int, seed: int, owners: Sequence[int]
    ) -> list[Generation]:
        """Seeded samples, each row with its own edit's matrices."""
        e = self.editor
        return e.evaluation.scorer().sample(
            e.model, e.tokenizer, prompts, max_length=max_length, seed=seed, owners=owners,
            row_context=self.deltas.rows,
        )


class PromptEdits(_View):
    """In-context edits: each query gets its own record's edit in its prompt.

    Args:
        editor: The editor (its ``model``, ``tokenizer`` and ``evaluation.scorer()``).
        contextualise: ``(prompts, owners) -> prompts`` with edit ``owners[i]`` in prompt ``i``.
        sample_in_context: Put the edit in fluency prompts too (IKE and LTE sample from the
            bare prompt, as KnowEdit measures fluency: ``False``).
        values: ``records -> values``: each record's method values (``record_values``) under
            its own edit only; ``None``: none.
    """

    def __init__(
        self,
        editor: Any,
        contextualise: Callable[[Sequence[str], Sequence[int]], list[str]],
        sample_in_context: bool = False,
        values: Callable[[Sequence[EditRecord]], list[dict[str, float | None]]] | None = None,
    ) -> None:
        super().__init__()
        self.editor = editor
        self.contextualise = contextualise
        self.sample_in_context = sample_in_context
        self._values = values

    def record_values(self, records: Sequence[EditRecord]) -> list[dict[str, float | None]]:
        """Each record's method values under its own edit (none without ``values``)."""
        return super().record_values(records) if self._values is None else self._values(records)

    def _pairs(self, pairs: Sequence[QAPair], owners: Sequence[int]) -> list[QAPair]:
        prompts = self.contextualise([p.prompt for p in pairs], owners)
        return [QAPair(c, p.answer, p.aliases) for c, p in zip(prompts, pairs, strict=True)]

    def score_pairs(self, pairs: Sequence[QAPair], owners: Sequence[int]) -> list[PairScore]:
        """Teacher-forced scores with each pair's own edit in context."""
        e = self.editor
        return e.evaluation.scorer().score(e.model, e.tokenizer, self._pairs(pairs, owners))

    def generate_answers(
        self, pairs: Sequence[QAPair], owners: Sequence[int]
    ) -> list[GeneratedAnswer]:
        """Greedy answers with each pair's own edit in context."""
        e = self.editor
        return e.evaluation.scorer().generate_answers(
            e.model, e.tokenizer, self._pairs(pairs, owners)
        )

    def sample(
        self, prompts: Sequence[str], max_length: int, seed: int, owners: Sequence[int]
    ) -> list[Generation]:
        """Seeded samples (from the bare prompts unless ``sample_in_context``)."""
        e = self.editor
        if self.sample_in_context:
            prompts = self.contextualise(prompts, owners)
        return e.evaluation.scorer().sample(
            e.model, e.tokenizer, prompts, max_length=max_length, seed=seed
        )
