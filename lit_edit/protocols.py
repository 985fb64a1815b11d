"""Editing protocols: single edit, batch edit and sequential (T-group) editing.

A protocol decides how a group of records is edited and when each record is scored. Every
protocol scores the group once before any edit (the pre-edit scores, reused for locality and for
the ``pre`` values of every record) and once or several times after, with the same scorer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from lit_edit.editor import Editor, apply_edit, apply_parallel_edits, open_sequence
from lit_edit.record_measure import RecordMeasure
from lit_edit.records import EditRecord


class Measurer(Protocol):
    """What a protocol needs from the engine (:class:`lit_edit.evaluation.RecordEvaluator`).

    The engine depends on the protocols (its settings name one); the protocols depend only on
    this interface, so neither module imports the other's at runtime or for type checking.
    """

    def measure(
        self, editor: Any, records: Sequence[EditRecord], parallel: bool = False
    ) -> list[RecordMeasure]:
        """Score every record under the editor's (or parallel view's) current state."""
        ...

    def values(
        self, pre: RecordMeasure, post: RecordMeasure, is_pre: bool = False
    ) -> dict[str, float | None]:
        """Metric values of one record from its pre- and post-edit measures."""
        ...


@dataclass
class RecordResult:
    """The scores of one record under a protocol.

    Attributes:
        record: The edit record.
        group: Index of the group (of ``group_size`` records) the record was edited in.
        position: 0-based position of the record's edit within its group.
        edits_applied: Number of edits in effect when the record was scored.
        pre: Metric values before any edit of the group (``None`` where not applicable).
        post: Metric values after editing.
        pre_measure: The scores behind ``pre`` (fed to the torchmetrics metrics).
        post_measure: The scores behind ``post``.
        locality_tokens: Per locality group, per pair: the pre- and post-edit argmax tokens at
            the answer positions (what locality compares), kept for ``records.jsonl`` so that a
            run can be audited after the raw scores are dropped.
    """

    record: EditRecord
    group: int
    position: int
    edits_applied: int
    pre: dict[str, float | None] = field(default_factory=dict)
    post: dict[str, float | None] = field(default_factory=dict)
    pre_measure: RecordMeasure | None = None
    post_measure: RecordMeasure | None = None
    locality_tokens: dict[str, list[dict[str, list[int]]]] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """The result as a ``records.jsonl`` line (without the raw scores)."""
        r = self.record
        return {
            "index": r.index,
            "source": r.source,
            "prompt": r.prompt,
            "target_new": r.target_new,
            "ground_truth": list(r.ground_truth),
            "group": self.group,
            "position": self.position,
            "edits_applied": self.edits_applied,
            "pre": self.pre,
            "post": self.post,
            "locality_tokens": self.locality_tokens,
        }


class EditingProtocol(ABC):
    """How edits are applied and when records are scored."""

    @property
    @abstractmethod
    def group_size(self) -> int:
        """Number of records the protocol consumes at a time."""

    @property
    def shard_unit(self) -> int:
        """Consecutive records that must be evaluated by one process when records are sharded.

        Every group leaves the editor as it found it, so whole groups can go to different
        processes (:mod:`lit_edit.sharding`) and give the values one process would: the default
        is the group size (a batch applied together, a sequence of kept edits).
        """
        return self.group_size

    @abstractmethod
    def run(
        self,
        editor: Editor,
        records: Sequence[EditRecord],
        evaluator: Measurer,
        group: int,
        progress: Callable[[int], None] | None = None,
    ) -> list[RecordResult]:
        """Edit and score one group of records, leaving the editor as it found it.

        Args:
            editor: The editor.
            records: At most ``group_size`` records.
            evaluator: Scores records under the editor's current state.
            group: Index of this group (for bookkeeping).
            progress: Called with the number of edits just applied (for a progress bar).

        Returns:
            One result per record, in order.
        """

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The protocol's name and settings, for summaries."""

    def check(self, editor: Editor) -> None:
        """Fail before any work if ``editor`` cannot run under this protocol.

        Every editor can by default.

        Raises:
            ValueError: naming the editor, the protocol and what to use instead.
        """
        return None

    @staticmethod
    def _results(
        records: Sequence[EditRecord],
        evaluator: Measurer,
        pre: Sequence[RecordMeasure],
        post: Sequence[RecordMeasure],
        group: int,
        positions: Sequence[int],
        applied: Sequence[int],
    ) -> list[RecordResult]:
        return [
            RecordResult(
                record=r,
                group=group,
                position=pos,
                edits_applied=n,
                pre=evaluator.values(a, a, is_pre=True),
                post=evaluator.values(a, b),
                pre_measure=a,
                post_measure=b,
            )
            for r, a, b, pos, n in zip(records, pre, post, positions, applied, strict=True)
        ]


def _tick(progress: Callable[[int], None] | None, n: int) -> None:
    """Report ``n`` applied edits to a progress callback, if any."""
    if progress is not None:
        progress(n)


def _check_edits_per_call(editor: Editor, n: int, what: str, alternative: str) -> None:
    """Refuse an editor whose ``max_edits_per_call`` is below the ``n`` edits a call gets.

    Raises:
        ValueError: naming the editor, ``what`` the protocol does and the ``alternative``.
    """
    limit = getattr(editor, "max_edits_per_call", None)
    if limit is not None and limit < n:
        raise ValueError(f"{type(editor).__name__} applies at most {limit} edit(s) at a time; "
                         f"{what}: use {alternative}")


class SingleEdit(EditingProtocol):
    """Edit one record, score it, restore; for every record (EasyEdit's default protocol).

    With ``parallel=K``, ``K`` records are edited independently at once and each is scored
    under its own edit only, in shared batched forwards (``editor.parallel_edit``, see
    :class:`~lit_edit.editor.ParallelEdits`): the same values as one by one (up to float
    rounding for weight edits), for a fraction of the forwards. Editors without parallel
    single edits are refused at the start.

    Args:
        chunk_size: Records scored together before editing (pre-edit scores are computed for a
            whole chunk in batched forwards, length-bucketed across the chunk). Does not change
            any value.
        parallel: Independent single edits applied and scored at once (1: one by one).
    """

    def __init__(self, chunk_size: int = 256, parallel: int = 1) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self.chunk_size = chunk_size
        self.parallel = parallel

    def check(self, editor: Editor) -> None:
        """Refuse ``parallel > 1`` for an editor without parallel single edits."""
        if self.parallel > 1 and getattr(editor, "parallel_edit", None) is None:
            raise ValueError(
                f"{type(editor).__name__} has no parallel single edits: use "
                "lit_edit.protocols.SingleEdit with parallel: 1"
            )

    @property
    def group_size(self) -> int:
        """Records consumed at a time (the chunk size)."""
        return self.chunk_size

    @property
    def shard_unit(self) -> int:
        """Single edits are independent: records can be sharded one by one.

        With ``parallel > 1``, by whole parallel edits (so that the same records are edited
        together as in one process), or by whole chunks when ``chunk_size`` is not a multiple of
        ``parallel``.
        """
        if self.parallel == 1:
            return 1
        return self.parallel if self.chunk_size % self.parallel == 0 else self.chunk_size

    def run(self, editor, records, evaluator, group, progress=None):
        """Edit, score and restore each record in turn (see :meth:`EditingProtocol.run`)."""
        pre = evaluator.measure(editor, records)
        post = []
        if self.parallel > 1:
            for i in range(0, len(records), self.parallel):
                chunk = list(records[i : i + self.parallel])
                with apply_parallel_edits(editor, chunk) as view:
                    _tick(progress, len(chunk))
                    post.extend(evaluator.measure(view, chunk, parallel=True))
        else:
            for record in records:
                with apply_edit(editor, [record]):
                    _tick(progress, 1)
                    post.extend(evaluator.measure(editor, [record]))
        n = len(records)
        return self._results(records, evaluator, pre, post, group, [0] * n, [1] * n)

    def describe(self) -> dict[str, Any]:
        """Name and settings."""
        return {"protocol": "single", "parallel": self.parallel}


class BatchEdit(EditingProtocol):
    """Apply ``batch_size`` edits at once, score all of them, restore.

    Args:
        batch_size: Number of edits applied together (the last group may be smaller).
    """

    def __init__(self, batch_size: int = 10) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    @property
    def group_size(self) -> int:
        """Records consumed at a time (the batch size)."""
        return self.batch_size

    def check(self, editor: Editor) -> None:
        """Refuse an editor that takes fewer edits per call than ``batch_size``."""
        _check_edits_per_call(editor, self.batch_size,
                              f"the batch protocol applies {self.batch_size} together",
                              "lit_edit.protocols.SingleEdit or SequentialEdit")

    def run(self, editor, records, evaluator, group, progress=None):
        """Edit all records at once, score, restore (see :meth:`EditingProtocol.run`)."""
        pre = evaluator.measure(editor, records)
        with apply_edit(editor, list(records)):
            _tick(progress, len(records))
            post = evaluator.measure(editor, records)
        n = len(records)
        return self._results(records, evaluator, pre, post, group, [0] * n, [n] * n)

    def describe(self) -> dict[str, Any]:
        """Name and settings."""
        return {"protocol": "batch", "batch_size": self.batch_size}


class SequentialEdit(EditingProtocol):
    """Apply ``group_size`` edits one after another, keeping them; roll back between groups.

    This is the WISE protocol (T = ``group_size``). When records are scored is an explicit choice:
    ``"after_group"`` scores every record of the group on the model after the group's last edit
    (the WISE and KnowEdit papers); ``"after_each"`` scores each record right after its own edit
    (EasyEdit since June 2026, LTE's SeqEdit scripts).

    A group is one edit sequence (:func:`~lit_edit.editor.open_sequence`): the editor keeps one
    copy of what the group's edits change in place, taken before the first, not one per edit,
    so memory does not grow with T for weight editors (an edit memory grows by its entries);
    the rollback at the end of the group is bit-exact, even when an edit or the scoring fails.

    With ``batch_size`` > 1 the group's edits are applied ``batch_size`` records at a time
    (sequential batches, e.g. AlphaEdit's 10 batches of 100: ``group_size`` 1000,
    ``batch_size`` 100); ``"after_each"`` then scores each batch right after it is applied.

    Args:
        group_size: T, the number of edits kept before rolling back.
        evaluate: ``"after_group"`` or ``"after_each"`` (required: there is no implicit default).
        batch_size: Records per edit call within the group (the last batch may be smaller).
    """

    def __init__(
        self,
        group_size: int,
        evaluate: Literal["after_group", "after_each"],
        batch_size: int = 1,
    ) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if evaluate not in ("after_group", "after_each"):
            raise ValueError(f"evaluate must be 'after_group' or 'after_each', got {evaluate!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.t = group_size
        self.evaluate = evaluate
        self.batch_size = batch_size

    def check(self, editor: Editor) -> None:
        """Refuse an editor that takes fewer edits per call than ``batch_size``."""
        _check_edits_per_call(editor, self.batch_size,
                              f"this sequential protocol applies {self.batch_size} per call",
                              "lit_edit.protocols.SequentialEdit with batch_size: 1")

    @property
    def group_size(self) -> int:
        """T."""
        return self.t

    def run(self, editor, records, evaluator, group, progress=None):
        """Edit one by one, keep the edits, score, roll back (see :meth:`EditingProtocol.run`)."""
        pre = evaluator.measure(editor, records)
        post = []
        applied: list[int] = []
        with open_sequence(editor) as sequence:
            for start in range(0, len(records), self.batch_size):
                batch = list(records[start : start + self.batch_size])
                sequence.push(apply_edit(editor, batch))
                _tick(progress, len(batch))
                applied.extend([start + len(batch)] * len(batch))
                if self.evaluate == "after_each":
                    post.extend(evaluator.measure(editor, batch))
            if self.evaluate == "after_group":
                post = evaluator.measure(editor, records)
        n = len(records)
        if self.evaluate == "after_group":
            applied = [n] * n
        return self._results(records, evaluator, pre, post, group, list(range(n)), applied)

    def describe(self) -> dict[str, Any]:
        """Name and settings."""
        out = {"protocol": "sequential", "group_size": self.t, "evaluate": self.evaluate}
        if self.batch_size > 1:
            out["batch_size"] = self.batch_size
        return out
