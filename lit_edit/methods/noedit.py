"""``NoEdit``: an editor that changes nothing, for pre-edit-only runs and baselines."""

from __future__ import annotations

from collections.abc import Sequence

from lit_edit.editing import CallbackHandle, EditHandle
from lit_edit.methods.base import EditorModule
from lit_edit.parallel_edits import PromptEdits
from lit_edit.records import EditRecord


class NoEdit(EditorModule):
    """The unedited model under every protocol: each "edit" is a no-op.

    Its post-edit scores are the pre-edit ones (locality 1 by construction), which makes it the
    reference row of a table, the way to score a model on edit data without editing it, and a
    measure of the evaluation's own cost (the protocols run exactly as for a real editor).

    Args:
        backbone: Model to score (see :class:`~lit_edit.methods.base.EditorModule`).
    """

    def edit(self, records: Sequence[EditRecord]) -> EditHandle:
        """Change nothing; the handle has nothing to restore."""
        return CallbackHandle(lambda: None)

    def parallel_edit(self, records: Sequence[EditRecord]) -> PromptEdits:
        """``K`` no-op edits at once: every query is scored by the unedited model."""
        return PromptEdits(self, lambda prompts, owners: list(prompts))
