"""What is measured on one record under one editor state (a plain container).

A leaf: the protocols pass measures from the evaluator to the results, the evaluation engine
fills them, and neither needs the other's module for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lit_edit.metrics.counterfact import CounterFactRecordScores
from lit_edit.scoring import PairScore


@dataclass
class RecordMeasure:
    """Everything measured on one record under one editor state.

    Attributes:
        edit: Score of ``(prompt, target_new)``.
        rephrase: Scores of the rephrase prompts with ``target_new``.
        rephrase_kinds: The record's kind of each rephrase (``EditRecord.rephrase_kinds``).
        portability: Scores of the portability pairs, by group.
        locality: Scores of the locality pairs, by group.
        answers: Greedy answers (exact match) by kind: ``"reliability"``, ``"generalization"``,
            ``"portability"`` (grouped), when exact match is on.
        fluency_text: The fluency generation, when fluency is on.
        counterfact: The CounterFact contrasts, when on and the record has a ground truth.
        extra: Method-specific values (:meth:`Editor.record_values`), e.g. retrieval hits.
    """

    edit: PairScore
    rephrase: list[PairScore]
    portability: dict[str, list[PairScore]]
    locality: dict[str, list[PairScore]]
    answers: dict[str, Any] = field(default_factory=dict)
    fluency_text: str | None = None
    counterfact: CounterFactRecordScores | None = None
    extra: dict[str, float | None] = field(default_factory=dict)
    rephrase_kinds: tuple[str, ...] = ()
