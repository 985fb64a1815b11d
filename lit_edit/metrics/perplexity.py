"""Perplexity of target answers (WISE hallucination editing, METHODS.md §6.1, §6.4)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lit_edit.metrics.aggregation import RecordMeanMetric
from lit_edit.scoring import PairScore


def record_perplexity(scores: PairScore | Sequence[PairScore]) -> float | None:
    """A record's perplexity ``exp(-(1/N) sum_t log p(y_t | ...))`` over all its target tokens.

    With one pair this is EasyEdit's ``PPL`` (``exp`` of the mean label NLL). Several pairs are
    pooled token-wise. Returns ``None`` for a record without pairs.
    """
    pairs = [scores] if isinstance(scores, PairScore) else list(scores)
    n_tokens = sum(s.n_tokens for s in pairs)
    if n_tokens == 0:
        return None
    return math.exp(-sum(s.sum_logprob for s in pairs) / n_tokens)


class Perplexity(RecordMeanMetric):
    """Mean over records of the per-record perplexity of the target tokens (lower is better).

    Args:
        **kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(aggregation="pairs", **kwargs)

    def update(self, records: Sequence[PairScore | Sequence[PairScore]]) -> None:
        """Add records.

        Args:
            records: Per record, its target's :class:`~lit_edit.scoring.PairScore` (or several,
                pooled token-wise).
        """
        for record in records:
            ppl = record_perplexity(record)
            if ppl is None:
                self.n_empty += 1
            else:
                self.total += ppl
                self.n_records += 1
                self.n_pairs += 1 if isinstance(record, PairScore) else len(record)
