"""The editing contract: what protocols and the evaluation engine need from an editor.

Every method (:class:`~lit_edit.methods.base.EditorModule` subclasses) satisfies it, and so can
any object with these members: the protocols (:mod:`lit_edit.protocols`) and the evaluation
engine (:mod:`lit_edit.evaluation`) depend on this interface only, never on a method's class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from lit_edit.editing import EditHandle, HandleStack
from lit_edit.records import EditRecord, QAPair
from lit_edit.scoring import GeneratedAnswer, Generation, PairScore


@runtime_checkable
class Editor(Protocol):
    """An editor: apply edits (restorably) and answer under the current state.

    Attributes:
        max_edits_per_call: Most records one :meth:`edit` call accepts (``None``: any number).
            A method that edits one fact at a time (ROME) sets 1, and the batch protocol
            refuses it with a clear error.
    """

    max_edits_per_call: int | None

    def edit(self, records: Sequence[EditRecord]) -> EditHandle:
        """Apply the edits of ``records`` together; the handle restores the state bit-exactly.

        Called by the protocols with grad enabled (outside any inference mode). An editor may
        also have ``edit_sequence()`` (optional, see :func:`open_sequence`): inside a sequence
        it opened, an edit's handle may rely on the sequence's copies and be undone only with
        the sequence.
        """
        ...

    def score_pairs(self, pairs: Sequence[QAPair]) -> list[PairScore]:
        """Teacher-forced scores of ``pairs`` under the current state, in order."""
        ...

    def generate_answers(self, pairs: Sequence[QAPair]) -> list[GeneratedAnswer]:
        """Greedy answers to the pairs' prompts under the current state (exact match)."""
        ...

    def sample(self, prompts: Sequence[str], max_length: int, seed: int) -> list[Generation]:
        """Seeded top-k samples from ``prompts`` under the current state (fluency)."""
        ...

    def record_values(self, records: Sequence[EditRecord]) -> list[dict[str, float | None]]:
        """Method-specific values of each record under the current state (e.g. routing)."""
        ...


@runtime_checkable
class ParallelEdits(Protocol):
    """``K`` independent single edits in effect at once: record ``k``'s queries see only edit ``k``.

    What an editor's ``parallel_edit(records)`` returns (parallel single edits,
    ``SingleEdit(parallel=K)``). Every call takes ``owners``: per pair (or prompt), the index of
    the record whose edit it is answered under. Its ``restore()`` (or context exit) brings the
    editor back bit-exactly.
    """

    def score_pairs(self, pairs: Sequence[QAPair], owners: Sequence[int]) -> list[PairScore]:
        """Teacher-forced scores, pair ``i`` under edit ``owners[i]``."""
        ...

    def generate_answers(
        self, pairs: Sequence[QAPair], owners: Sequence[int]
    ) -> list[GeneratedAnswer]:
        """Greedy answers, pair ``i`` under edit ``owners[i]``."""
        ...

    def sample(
        self, prompts: Sequence[str], max_length: int, seed: int, owners: Sequence[int]
    ) -> list[Generation]:
        """Seeded samples, prompt ``i`` under edit ``owners[i]``."""
        ...

    def record_values(self, records: Sequence[EditRecord]) -> list[dict[str, float | None]]:
        """Method-specific values of record ``k`` under edit ``k``."""
        ...

    def restore(self) -> None:
        """Undo the edits."""
        ...

    def __enter__(self) -> ParallelEdits: ...

    def __exit__(self, *exc: object) -> None: ...


def apply_parallel_edits(editor: Editor, records: Sequence[EditRecord]) -> ParallelEdits:
    """Apply every record's edit independently at once (``editor.parallel_edit``).

    Runs with grad enabled outside inference mode, like :func:`apply_edit`.

    Raises:
        ValueError: if the editor has no parallel single edits.
    """
    parallel = getattr(editor, "parallel_edit", None)
    if parallel is None:
        raise ValueError(
            f"{type(editor).__name__} has no parallel single edits: use "
            "lit_edit.protocols.SingleEdit with parallel=1"
        )
    with torch.inference_mode(False), torch.enable_grad():
        return parallel(records)


def open_sequence(editor: Editor) -> HandleStack:
    """Start a sequence of edits undone together (the sequential protocol's group).

    ``editor.edit_sequence()`` when the editor has one (every
    :class:`~lit_edit.methods.base.EditorModule`: one copy of what the edits change, however
    many they are, :class:`~lit_edit.editing.EditSequence`); otherwise a
    :class:`~lit_edit.editing.HandleStack` of the per-edit handles. Either way, push each
    edit's handle and restore (or exit) once, at the end.

    Returns:
        The sequence (a handle stack).
    """
    start = getattr(editor, "edit_sequence", None)
    return start() if start is not None else HandleStack()


def apply_edit(editor: Editor, records: Sequence[EditRecord]) -> EditHandle:
    """Call ``editor.edit(records)`` the way every protocol does.

    Edits optimise or differentiate (FT's steps, MEND's gradient), so they run with grad
    enabled and outside inference mode, whatever the caller's mode (Lightning's test loop runs
    under ``torch.inference_mode``). Scoring stays in the caller's mode.

    Raises:
        ValueError: if the editor takes fewer records per call than given.
    """
    limit = getattr(editor, "max_edits_per_call", None)
    if limit is not None and len(records) > limit:
        raise ValueError(
            f"{type(editor).__name__} applies at most {limit} edit(s) at a time, got "
            f"{len(records)}: use the single or sequential protocol"
        )
    with torch.inference_mode(False), torch.enable_grad():
        return editor.edit(records)
