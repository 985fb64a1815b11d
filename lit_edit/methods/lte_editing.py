"""LTE's inference phase: editing by retrieval from an edit memory (METHODS.md §5.5)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from lit_edit.editing import CallbackHandle, EditHandle
from lit_edit.nn.lte_templates import edit_prompt
from lit_edit.nn.retrieval import Retriever, load_encoder
from lit_edit.parallel_edits import PromptEdits
from lit_edit.records import EditRecord

_T = TypeVar("_T")


class RetrievalEditing:
    """Editing by retrieval, mixed into :class:`~lit_edit.methods.lte.LTEEditor`.

    An edit is an insertion into :attr:`memory`; every scored or generated question gets its
    retrieved facts in the template first. Uses the editor's ``memory``, ``retriever_name``,
    ``top_k``, ``threshold``, scope settings, ``question_states``, ``template`` and ``wrap``.
    """

    @property
    def retriever(self) -> Retriever:
        """The retriever over :attr:`memory` (its encoder is loaded on first use)."""
        if self._retriever is None:
            self._retriever = Retriever(
                load_encoder(self.retriever_name),
                self.memory,
                self.top_k,
                self.threshold,
                scope=self.scope_head,
                scope_threshold=self.scope.threshold if self.scope else 0.5,
                candidates=self.scope.candidates if self.scope else 8,
                states=self.question_states,
            )
        return self._retriever

    def edit_state_keys(self) -> set[str]:
        """The edit memory (an edit is an insertion; no weight changes)."""
        return {"memory._extra_state"}

    def edit(self, records: Sequence[EditRecord]) -> EditHandle:
        """Insert the records' edits into the memory (in bulk); the handle removes them.

        Args:
            records: Records edited together.

        Returns:
            A handle that truncates the memory back to its previous size.
        """
        size = self.retriever.insert([r.prompt for r in records], [r.fact for r in records])
        return CallbackHandle(lambda: self.memory.truncate(size))

    def parallel_edit(self, records: Sequence[EditRecord]) -> PromptEdits:
        """``K`` independent single edits: each question is asked with its own record's edit.

        The question of record ``k`` is contextualised (retrieval, scope, template) with the
        memory as it is plus edit ``k`` alone, exactly as the one-by-one protocol does; the
        model's forwards then batch across records like any prompts. The memory is left as
        it was. Each record's retrieval values are those under its own edit.
        """
        records = list(records)

        def alone(k: int, run: Callable[[], _T]) -> _T:
            """``run()`` with edit ``k`` inserted, then the memory back as it was."""
            handle = self.edit([records[k]])
            try:
                return run()
            finally:
                handle.restore()

        def contexts(questions: Sequence[str], owners: Sequence[int]) -> list[str]:
            """Each question contextualised under its owner's edit only."""
            out = list(questions)
            by_owner: dict[int, list[int]] = {}
            for i, k in enumerate(owners):
                by_owner.setdefault(k, []).append(i)
            for k, rows in by_owner.items():
                shown = alone(k, lambda rows=rows: self.contextualise([questions[i] for i in rows]))
                for i, text in zip(rows, shown, strict=True):
                    out[i] = text
            return out

        def values(scored: Sequence[EditRecord]) -> list[dict[str, float | None]]:
            """Each scored record's retrieval values under its own edit."""
            index = {id(r): k for k, r in enumerate(records)}
            return [alone(index[id(r)], lambda r=r: self.record_values([r])[0]) for r in scored]

        return PromptEdits(self, contexts, values=values)

    def contextualise(self, questions: Sequence[str]) -> list[str]:
        """The prompts the model sees: retrieved facts in the template, chat-wrapped.

        A question with no retrieved fact (empty memory, or all below the threshold) is asked
        bare.
        """
        found = self.retriever.retrieve(list(questions)) if len(self.memory) else None
        out = []
        for i, q in enumerate(questions):
            facts = [r.fact for r in found[i]] if found is not None else []
            out.append(self.wrap(edit_prompt(facts, q, self.template) if facts else q))
        return out

    def record_values(self, records: Sequence[EditRecord]) -> list[dict[str, float | None]]:
        """Retrieval hit rates of each record's in-scope queries (edit, rephrases, portability).

        Returns:
            Per record ``{"retrieval/hit@1", "retrieval/hit@k"}`` (empty with an empty memory).
        """
        if not len(self.memory):
            return [{} for _ in records]
        queries = [
            [r.prompt, *r.rephrase_prompts, *(p.prompt for g in r.portability.values() for p in g)]
            for r in records
        ]
        flat = [q for qs in queries for q in qs]
        found = self.retriever.retrieve(flat, max(self.top_k, 1))
        out, i = [], 0
        for r, qs in zip(records, queries, strict=True):
            hits = found[i : i + len(qs)]
            i += len(qs)
            top1 = [bool(h) and h[0].fact == r.fact for h in hits]
            topk = [any(x.fact == r.fact for x in h) for h in hits]
            out.append({
                "retrieval/hit@1": sum(top1) / len(qs),
                "retrieval/hit@k": sum(topk) / len(qs),
            })
        return out
