"""Locality questions that another edit of the same group changes.

With several edits in the model (batch and sequential protocols), a record's locality question
may ask about a fact that *another* applied edit changed ("X lives in" for a record editing
"X was born in", while another record of the group edits "X lives in"). Its answer should then
change, yet locality (agreement with the unedited model) counts the change as damage.

A locality pair ``(q, a)`` of record ``r`` is taken to ask about the fact of another record
``e`` of the group when ``q`` is ``e``'s edit question or one of its rephrases, or when ``e``
has a subject that ``q`` names and ``a`` is ``e``'s first ground truth (the old object of the
fact ``e`` edits). The rule needs no fact identifiers, so it applies to every dataset with
subjects and ground truths (TinyFacts, CounterFact, ZsRE); it cannot see a fact asked under
another name (an alias).
"""

from __future__ import annotations

from collections.abc import Sequence

from lit_edit.records import EditRecord


def first_conflicts(records: Sequence[EditRecord]) -> list[dict[str, list[int | None]]]:
    """For each locality pair of each record, the first other record of the group it asks about.

    Args:
        records: A group of records, in the order their edits are applied.

    Returns:
        Per record, per locality group, per pair: the smallest position ``j != i`` in
        ``records`` whose edit changes the pair's fact (see the module docstring), or ``None``.
        Under a protocol that applies the first ``n`` edits of the group, the pair conflicts
        when ``j < n``.
    """
    by_question: dict[str, list[int]] = {}
    by_answer: dict[str, list[tuple[int, str]]] = {}
    for j, e in enumerate(records):
        for question in dict.fromkeys((e.prompt, *e.rephrase_prompts)):
            by_question.setdefault(question, []).append(j)
        if e.subject and e.ground_truth:
            by_answer.setdefault(e.ground_truth[0], []).append((j, e.subject))
    out = []
    for i, record in enumerate(records):
        groups: dict[str, list[int | None]] = {}
        for key, pairs in record.locality.items():
            firsts: list[int | None] = []
            for pair in pairs:
                hits = [j for j in by_question.get(pair.prompt, ()) if j != i]
                hits += [
                    j for j, subject in by_answer.get(pair.answer, ())
                    if j != i and subject in pair.prompt
                ]
                firsts.append(min(hits) if hits else None)
            groups[key] = firsts
        out.append(groups)
    return out
