"""One evaluation run.

It groups records for the protocol, updates the torchmetrics metrics and keeps the per-record
results for the results writer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from lit_edit.conflicts import first_conflicts
from lit_edit.editing import ParameterSnapshot
from lit_edit.editor import Editor
from lit_edit.environment import describe_environment
from lit_edit.evaluation import Evaluation, RecordEvaluator
from lit_edit.metrics import (
    CounterFactScores,
    ExactMatch,
    LocalityAgreement,
    NGramEntropy,
    Perplexity,
    TokenAccuracy,
)
from lit_edit.protocols import RecordResult
from lit_edit.record_measure import RecordMeasure
from lit_edit.records import EditRecord
from lit_edit.sharding import world_and_rank

#: (metric, update from the pre- and post-edit measures of a list of records)
_Entry = tuple[Metric, Callable[[list[RecordMeasure], list[RecordMeasure]], None]]


def _finite(value: Any) -> float | None:
    """A float, or ``None`` for NaN/None (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


class EvaluationRun:
    """State of one ``trainer.test`` of an editor.

    Args:
        settings: The evaluation settings.
        snapshot: A copy of the editor's tensors to verify each restore against (optional).
        device: Device of the metric states (the editor's device, for cross-process sync).
        progress: Called with the number of edits applied, after each edit (a progress bar).
        start: Position, among all the evaluation's records, of the first record this run
            receives (``0`` in one process; a process's shard start when records are sharded
            across processes, :mod:`lit_edit.sharding`). Groups are cut at multiples of the
            protocol's group size counted from the first record of the evaluation, and numbered
            that way, so that every process forms and numbers the groups one process would.
    """

    def __init__(
        self,
        settings: Evaluation,
        snapshot: ParameterSnapshot | None = None,
        device: torch.device | str = "cpu",
        progress: Callable[[int], None] | None = None,
        start: int = 0,
    ) -> None:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.settings = settings
        self._progress = progress
        self.protocol = settings.protocol
        self.evaluator = RecordEvaluator(settings)
        self.snapshot = snapshot
        self.results: list[RecordResult] = []
        self.n_edited = 0
        self._pending: list[EditRecord] = []
        self._extra_keys: dict[str, None] = {}  # the editor's record_values keys, in order
        self._position = start  # position of the first pending record among all records
        self._start = start
        self._resumed_rows: list[dict[str, Any]] = []  # rows of a continued run's done records
        self._skip = 0  # records still to drop from the input (done before a resume)
        self._entries = self._make_metrics()
        for metric, _ in self._entries.values():
            metric.to(device)

    def _make_metrics(self) -> dict[str, _Entry]:
        """The metrics these settings ask for, with how each one updates."""
        agg = self.settings.aggregation
        entries: dict[str, _Entry] = {}
        for prefix, use_pre in (("", False), ("pre_", True)):

            def pick(pre, post, use_pre=use_pre):  # noqa: ANN001, ANN202
                """The pre-edit value for the ``pre_`` metrics, the post-edit one otherwise."""
                return pre if use_pre else post

            entries[prefix + "reliability"] = (
                TokenAccuracy(agg),
                lambda a, b, m, p=pick: m.update([[x.edit] for x in p(a, b)]),
            )
            entries[prefix + "generalization"] = (
                TokenAccuracy(agg),
                lambda a, b, m, p=pick: m.update([x.rephrase for x in p(a, b)]),
            )
            entries[prefix + "portability"] = (
                TokenAccuracy(agg),
                lambda a, b, m, p=pick: m.update([x.portability for x in p(a, b)]),
            )
            if self.settings.exact_match:
                for kind in ("reliability", "generalization", "portability"):
                    entries[f"{prefix}{kind}_em"] = (
                        ExactMatch(agg),
                        lambda a, b, m, p=pick, k=kind: m.update([x.answers[k] for x in p(a, b)]),
                    )
            if self.settings.perplexity:
                entries[prefix + "perplexity"] = (
                    Perplexity(),
                    lambda a, b, m, p=pick: m.update([x.edit for x in p(a, b)]),
                )
            if self.settings.fluency:
                entries[prefix + "fluency"] = (
                    NGramEntropy(),
                    lambda a, b, m, p=pick: m.update([x.fluency_text or [] for x in p(a, b)]),
                )
            if self.settings.counterfact:
                entries[prefix + "counterfact"] = (
                    CounterFactScores(),
                    lambda a, b, m, p=pick: m.update(
                        [x.counterfact for x in p(a, b) if x.counterfact is not None]
                    ),
                )
        entries["locality"] = (
            LocalityAgreement(agg),
            lambda a, b, m: m.update([x.locality for x in a], [x.locality for x in b]),
        )
        return {name: (metric, self._bind(metric, fn)) for name, (metric, fn) in entries.items()}

    @staticmethod
    def _bind(metric: Metric, fn: Callable[..., None]) -> Callable[[list, list], None]:
        return lambda pre, post: fn(pre, post, metric)

    @property
    def metrics(self) -> dict[str, Metric]:
        """The metric objects by name (``counterfact`` computes a dict of scores)."""
        return {name: metric for name, (metric, _) in self._entries.items()}

    def add(self, editor: Editor, records: Sequence[EditRecord]) -> list[dict[str, float]]:
        """Queue records and run the protocol on every complete group.

        Returns:
            The mean post-edit values of each group that ran.
        """
        if self._skip:
            dropped = min(self._skip, len(records))
            records, self._skip = records[dropped:], self._skip - dropped
            if self._progress is not None:
                self._progress(dropped)
        self._pending.extend(records)
        means = []
        size = self.protocol.group_size
        while self._pending:
            need = size - self._position % size  # records up to the next group boundary
            if len(self._pending) < need:
                break
            group, self._pending = self._pending[:need], self._pending[need:]
            means.append(self._run_group(editor, group))
        return means

    def flush(self, editor: Editor) -> list[dict[str, float]]:
        """Run the protocol on the last, incomplete group (if any)."""
        if not self._pending:
            return []
        group, self._pending = self._pending, []
        return [self._run_group(editor, group)]

    def _run_group(self, editor: Editor, records: list[EditRecord]) -> dict[str, float]:
        """Run the protocol on one group, verify the restore, update metrics and results."""
        index = self._position // self.protocol.group_size
        with torch.inference_mode(False):
            results = self.protocol.run(
                editor, records, self.evaluator, index, progress=self._progress
            )
        if self.snapshot is not None:
            changed = self.snapshot.differences(editor)
            if changed:
                raise RuntimeError(
                    f"{type(editor).__name__}: restoring group {index} did not bring back "
                    f"{len(changed)} tensor(s) bit-exactly, e.g. {changed[:5]}"
                )
        self._position += len(records)
        self.n_edited += len(records)
        if self.settings.locality_conflicts == "exclude":
            self._exclude_conflicts(records, results)
        pre = [r.pre_measure for r in results]
        post = [r.post_measure for r in results]
        for m in post:
            self._extra_keys.update(dict.fromkeys(m.extra))
        for _, update in self._entries.values():
            update(pre, post)
        for r in results:  # keep the values and the locality tokens, drop the raw scores
            assert r.pre_measure is not None and r.post_measure is not None
            r.locality_tokens = {
                key: [
                    {"pre": a.pred_ids.tolist(), "post": b.pred_ids.tolist()}
                    for a, b in zip(r.pre_measure.locality[key], pairs, strict=True)
                ]
                for key, pairs in r.post_measure.locality.items()
            }
            r.pre_measure = r.post_measure = None
        self.results.extend(results)
        keys = ("reliability", "generalization", "locality", "portability")
        means = {}
        for key in keys:
            values = [r.post[key] for r in results if r.post.get(key) is not None]
            if values:
                means[key] = sum(values) / len(values)
        return means

    def _exclude_conflicts(self, records: list[EditRecord], results: list[RecordResult]) -> None:
        """Drop the locality pairs another edit in effect changed; recompute the locality values.

        ``results`` are in the order of ``records``. A record scored with more than one edit
        in effect has the first ``edits_applied`` edits of its group in effect (every protocol
        applies them in order: all of a batch, the first ``i + 1`` in sequential editing scored
        after each edit); a single edit has only its own. The record loses the pairs whose first
        conflicting record (:func:`~lit_edit.conflicts.first_conflicts`) is among them;
        ``post["locality_excluded"]`` counts them.
        """
        firsts = first_conflicts(records)
        for r, first in zip(results, firsts, strict=True):
            assert r.pre_measure is not None and r.post_measure is not None
            keep = {
                key: [j is None or r.edits_applied == 1 or j >= r.edits_applied for j in js]
                for key, js in first.items()
            }
            excluded = sum(not ok for oks in keep.values() for ok in oks)
            r.post["locality_excluded"] = float(excluded)
            if not excluded:
                continue
            pre_m, post_m = r.pre_measure, r.post_measure
            r.pre_measure = dataclasses.replace(pre_m, locality={
                key: [s for s, ok in zip(pre_m.locality[key], oks, strict=True) if ok]
                for key, oks in keep.items()
            })
            r.post_measure = dataclasses.replace(post_m, locality={
                key: [s for s, ok in zip(post_m.locality[key], oks, strict=True) if ok]
                for key, oks in keep.items()
            })
            for key in [k for k in r.post if k == "locality" or k.startswith("locality/")]:
                del r.post[key]
            r.post.update(self.evaluator.locality_values(r.pre_measure, r.post_measure))

    def extra_means(self, rows: Sequence[dict[str, Any]] | None = None) -> dict[str, float]:
        """The mean of every method-specific value (``Editor.record_values``).

        Args:
            rows: Every process's rows (default: this process's results).
        """
        if rows is None:
            posts = [r["post"] for r in self._resumed_rows] + [r.post for r in self.results]
        else:
            posts = [r["post"] for r in rows]
        out = {}
        for key in self._extra_keys:
            values = [post[key] for post in posts if post.get(key) is not None]
            if values:
                out[key] = sum(values) / len(values)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """This process's per-record rows (``records.jsonl`` lines)."""
        return self.rows_since(0)

    def rows_since(self, n: int) -> list[dict[str, Any]]:
        """The rows after the first ``n`` (those not written yet)."""
        resumed = self._resumed_rows[n:]
        return resumed + [r.to_row() for r in self.results[max(0, n - len(self._resumed_rows)):]]

    def progress(self) -> dict[str, Any]:
        """What a continued run needs after the groups run so far (see :meth:`resume`).

        Returns:
            ``done`` (records of the completed groups), ``position``, ``n_edited``,
            ``extra_keys`` and ``metrics`` (each metric's torchmetrics state), of tensors and
            plain values only.
        """
        return {
            "done": self._position - self._start,
            "position": self._position,
            "n_edited": self.n_edited,
            "extra_keys": list(self._extra_keys),
            "metrics": {
                name: {k: v.detach().clone().cpu() for k, v in metric.metric_state.items()}
                for name, metric in self.metrics.items()
            },
        }

    def resume(self, progress: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Continue a run from its :meth:`progress` and the rows it wrote.

        The first ``done`` records given to :meth:`add` are dropped (they are done), the metric
        states are merged into the fresh metrics (``0 + s == s``: the sums then continue exactly
        as in the uninterrupted run).

        Raises:
            ValueError: if this run has evaluated records already, or the saved metrics are not
                this run's.
        """
        if self.results or self._pending or self._position != self._start:
            raise ValueError("resume() must come before any record is evaluated")
        saved = progress["metrics"]
        if set(saved) != set(self.metrics):
            raise ValueError(
                f"the saved metrics {sorted(saved)} are not this run's {sorted(self.metrics)}"
            )
        for name, metric in self.metrics.items():
            metric.merge_state({k: v.to(metric.device) for k, v in saved[name].items()})
        self._skip = int(progress["done"])
        self._position = int(progress["position"])
        self.n_edited = int(progress["n_edited"])
        self._extra_keys = dict.fromkeys(progress["extra_keys"])
        self._resumed_rows = list(rows)

    def computed(self) -> dict[str, float | None]:
        """Every metric's value (synced across processes), CounterFact scores flattened."""
        out: dict[str, float | None] = {}
        for name, metric in self.metrics.items():
            value = metric.compute()
            if isinstance(value, dict):  # CounterFact: ES, EM, PS, ...
                prefix = "pre_" if name.startswith("pre_") else ""
                out.update({prefix + k: _finite(v) for k, v in value.items()})
            else:
                out[name] = _finite(value)
        return out

    def summary(self, editor: Editor, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The content of ``summary.json``.

        One key per post-edit metric, then pre-edit values, per-group breakdowns, counts, the
        protocol and the settings.

        Args:
            editor: The evaluated editor.
            rows: Every process's rows (for the per-group breakdowns).
        """
        values = self.computed()
        post = {k: v for k, v in values.items() if not k.startswith("pre_")}
        pre = {k[4:]: v for k, v in values.items() if k.startswith("pre_")}
        breakdown: dict[str, list[float]] = {}
        for row in rows:
            for key, value in row["post"].items():
                if "/" in key and value is not None:
                    breakdown.setdefault(key, []).append(value)
        counted = {
            name: m for name, m in self.metrics.items()
            if hasattr(m, "n_empty") and not name.startswith("pre_")
        }
        with contextlib.ExitStack() as synced:  # every process's counts (a collective)
            for m in counted.values():
                synced.enter_context(m.sync_context())
            counts: dict[str, Any] = {
                name: {"records": int(m.n_records), "empty": int(m.n_empty)}
                for name, m in counted.items()
            }
        if self.settings.locality_conflicts == "exclude":
            counts["locality"]["pairs_excluded"] = int(
                sum(row["post"].get("locality_excluded") or 0 for row in rows)
            )
        return {
            **post,
            "pre": pre,
            "breakdown": {k: sum(v) / len(v) for k, v in sorted(breakdown.items())},
            "n_records": len(rows),
            "counts": counts,
            "protocol": self.protocol.describe(),
            "settings": self.settings.describe(),
            "method": f"{type(editor).__module__}.{type(editor).__qualname__}",
            # the process count changes the metrics' float reduction order (sums per process)
            "environment": {**describe_environment(), "processes": world_and_rank()[0]},
            "hyper_parameters": {
                k: _jsonable(v) for k, v in dict(getattr(editor, "hparams", {})).items()
            },
        }


def _jsonable(value: Any) -> Any:
    """A JSON-friendly version of a hyper-parameter value."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
