"""Per-record aggregation shared by the record-averaged metrics.

A *record* contributes either a flat sequence of per-pair items or named groups of them
(``{"Reasoning": [...], "Subject_Aliasing": [...]}``, as in an
:class:`~lit_edit.records.EditRecord`'s portability and locality). Each item is first reduced to a
per-pair value ``v`` (e.g. token accuracy); the record's value is then

* ``aggregation="keys"`` (default; EasyEdit's KnowEdit tables, METHODS.md §6.3)::

      r = mean_{k : n_k > 0} ( (1 / n_k) * sum_{j} v_{k, j} )

  the mean over the record's non-empty groups of each group's mean;
* ``aggregation="pairs"``: the mean over all pairs of all groups.

For a flat sequence (a single group) both are the mean over its pairs. The metric value is the
mean of ``r`` over records. Records without any pair (e.g. a record with no portability questions)
are excluded from that mean and counted in the ``n_empty`` state instead.

EasyEdit's per-key summary (``summary_metrics``: per key, mean over records of the record's mean
for that key) is obtained with one metric per key, fed that key's pairs only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torchmetrics import Metric

T = TypeVar("T")
U = TypeVar("U")

#: One record's items: a flat sequence, or named groups of items.
Groups = Sequence[T] | Mapping[str, Sequence[T]]

AGGREGATIONS = ("keys", "pairs")


def check_aggregation(aggregation: str) -> str:
    """Validate an aggregation name (``"keys"`` or ``"pairs"``) and return it."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    return aggregation


def as_groups(record: Groups[T]) -> dict[str, list[T]]:
    """A record's items as named groups (a flat sequence becomes the single group ``""``)."""
    if isinstance(record, Mapping):
        return {str(k): list(v) for k, v in record.items()}
    if isinstance(record, (str, bytes)):
        raise TypeError("a record must be a sequence or a mapping of sequences, not a string")
    return {"": list(record)}


def map_groups(fn: Callable[[T], U], record: Groups[T]) -> dict[str, list[U]]:
    """Apply ``fn`` to every item of a record, keeping its groups."""
    return {k: [fn(x) for x in v] for k, v in as_groups(record).items()}


def record_mean(values: Groups[float], aggregation: str = "keys") -> float | None:
    """Aggregate one record's per-pair values (see the module docstring).

    Args:
        values: Per-pair values, flat or grouped by key.
        aggregation: ``"keys"`` (mean of the non-empty groups' means) or ``"pairs"``.

    Returns:
        The record's value, or ``None`` when it has no pair.
    """
    check_aggregation(aggregation)
    groups = [g for g in as_groups(values).values() if g]
    if not groups:
        return None
    if aggregation == "keys":
        return sum(sum(g) / len(g) for g in groups) / len(groups)
    flat = [v for g in groups for v in g]
    return sum(flat) / len(flat)


class RecordMeanMetric(Metric):
    """Base of the metrics that average a per-record value over records.

    States (all summed across processes): ``total`` (sum of record values, float64),
    ``n_records`` (records with at least one pair), ``n_empty`` (records without any pair) and
    ``n_pairs`` (pairs seen). :meth:`compute` returns ``total / n_records`` (NaN before any
    non-empty record).

    Args:
        aggregation: How a record's pairs are combined: ``"keys"`` or ``"pairs"``
            (see :mod:`lit_edit.metrics.aggregation`).
        **kwargs: Passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    total: torch.Tensor
    n_records: torch.Tensor
    n_empty: torch.Tensor
    n_pairs: torch.Tensor

    def __init__(self, aggregation: str = "keys", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.aggregation = check_aggregation(aggregation)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_records", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_empty", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_pairs", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add_records(self, records: Iterable[Groups[float]]) -> None:
        """Add per-pair values of several records to the states."""
        for values in records:
            value = record_mean(values, self.aggregation)
            if value is None:
                self.n_empty += 1
                continue
            self.total += value
            self.n_records += 1
            self.n_pairs += sum(len(g) for g in as_groups(values).values())

    def compute(self) -> torch.Tensor:
        """Mean of the record values over non-empty records (a float64 scalar; NaN if none)."""
        if int(self.n_records) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.total.device)
        return self.total / self.n_records
