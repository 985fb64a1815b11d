"""In-context editing (IKE/ICE): the new fact is put in the prompt; no weight changes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lit_edit.backbone import Backbone
from lit_edit.editing import CallbackHandle, EditHandle
from lit_edit.methods.base import EditorModule
from lit_edit.parallel_edits import PromptEdits
from lit_edit.records import EditRecord


class IKEEditor(EditorModule):
    """In-context knowledge editing without demonstrations (ICE, as in the KnowEdit tables).

    ``edit`` appends the records' facts (``prompt + " " + target_new``) to an edit memory; every
    later query is scored with the facts of the memory written before it through ``template``.
    With more than ``max_facts`` facts in memory the newest ``max_facts`` are used (newest last,
    closest to the query). Pre-edit scores (empty memory) use the bare prompt, so locality is the
    agreement between the bare and the in-context predictions. Fluency samples come from the bare
    prompts, as KnowEdit and LTE measure it.

    Args:
        backbone: Model to edit (see :class:`~lit_edit.methods.base.EditorModule`).
        template: Context template with ``{facts}`` (one per line) and ``{prompt}``; the default
            is EasyEdit's IKE/ICE wording.
        max_facts: Most facts put in a context.
    """

    def __init__(
        self,
        backbone: Backbone | str = "tinyfacts",
        template: str = "New Fact: {facts}\nPrompt: {prompt}",
        max_facts: int = 8,
    ) -> None:
        super().__init__(backbone)
        if "{facts}" not in template or "{prompt}" not in template:
            raise ValueError(f"template must contain {{facts}} and {{prompt}}, got {template!r}")
        if max_facts < 1:
            raise ValueError(f"max_facts must be >= 1, got {max_facts}")
        self.template = template
        self.max_facts = max_facts
        self.memory: list[str] = []

    def edit_state_keys(self) -> set[str]:
        """The memory of facts (its extra state; no weight changes)."""
        return {"_extra_state"}

    def get_extra_state(self) -> dict[str, Any]:
        """The memory of facts, saved in ``state_dict`` (and checkpoints)."""
        return {"memory": list(self.memory)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the memory written by :meth:`get_extra_state`."""
        self.memory = list(state.get("memory", []))

    def edit(self, records: Sequence[EditRecord]) -> EditHandle:
        """Add the records' facts to the memory; the handle removes them.

        Args:
            records: Records edited together.

        Returns:
            A handle that truncates the memory back to its previous size.
        """
        size = len(self.memory)
        self.memory.extend(r.fact for r in records)

        def undo() -> None:
            """Drop the facts this edit appended to the memory."""
            del self.memory[size:]

        return CallbackHandle(undo)

    def parallel_edit(self, records: Sequence[EditRecord]) -> PromptEdits:
        """``K`` independent single edits: each query gets only its own record's fact."""
        facts = [r.fact for r in records]
        memory = list(self.memory)

        def contexts(prompts: Sequence[str], owners: Sequence[int]) -> list[str]:
            """Each prompt with the memory's facts and its owner's fact in front."""
            out = []
            for prompt, k in zip(prompts, owners, strict=True):
                shown = "\n".join([*memory, facts[k]][-self.max_facts :])
                out.append(self.template.format(facts=shown, prompt=prompt))
            return out

        return PromptEdits(self, contexts)

    def contextualise(self, prompts: Sequence[str]) -> list[str]:
        """The prompts with the memory's facts in front (the bare prompts when memory is empty)."""
        if not self.memory:
            return list(prompts)
        facts = "\n".join(self.memory[-self.max_facts :])
        return [self.template.format(facts=facts, prompt=p) for p in prompts]
