"""Editing protocols: order of edits and measurements, restores, bookkeeping (fake editor)."""

import pytest

from lit_edit.editing import CallbackHandle, HandleStack, ParameterSnapshot, WeightsHandle
from lit_edit.protocols import BatchEdit, SequentialEdit, SingleEdit
from lit_edit.records import EditRecord


class FakeEditor:
    """Keeps a memory of edited record indices and a log of every call."""

    def __init__(self):
        self.memory: list[int] = []
        self.log: list[str] = []

    def edit(self, records):
        size = len(self.memory)
        self.memory.extend(r.index for r in records)
        self.log.append("edit:" + ",".join(str(r.index) for r in records))

        def undo():
            del self.memory[size:]
            self.log.append(f"restore->{size}")

        return CallbackHandle(undo)


class FakeEvaluator:
    """A record's measure is the editor's memory when it was measured."""

    def measure(self, editor, records):
        editor.log.append("measure:" + ",".join(str(r.index) for r in records))
        return [tuple(editor.memory) for _ in records]

    def values(self, pre, post, is_pre=False):
        return {"memory": list(post), "is_pre": is_pre}


def records(n):
    return [EditRecord(f"Prompt {i} is", f"T{i}", index=i) for i in range(n)]


def test_single_edit_scores_each_record_alone_and_restores():
    editor, recs = FakeEditor(), records(3)
    results = SingleEdit(chunk_size=3).run(editor, recs, FakeEvaluator(), group=7)
    assert editor.log == [
        "measure:0,1,2",  # pre-edit scores, once for the chunk
        "edit:0", "measure:0", "restore->0",
        "edit:1", "measure:1", "restore->0",
        "edit:2", "measure:2", "restore->0",
    ]
    assert editor.memory == []
    assert [r.post["memory"] for r in results] == [[0], [1], [2]]
    assert all(r.pre == {"memory": [], "is_pre": True} for r in results)
    assert [(r.group, r.position, r.edits_applied) for r in results] == [(7, 0, 1)] * 3


def test_batch_edit_applies_all_then_scores_all():
    editor, recs = FakeEditor(), records(4)
    results = BatchEdit(batch_size=4).run(editor, recs, FakeEvaluator(), group=0)
    assert editor.log == ["measure:0,1,2,3", "edit:0,1,2,3", "measure:0,1,2,3", "restore->0"]
    assert all(r.post["memory"] == [0, 1, 2, 3] for r in results)
    assert all(r.edits_applied == 4 for r in results)


def test_sequential_after_each_scores_right_after_each_edit():
    editor, recs = FakeEditor(), records(3)
    results = SequentialEdit(3, "after_each").run(editor, recs, FakeEvaluator(), group=0)
    assert editor.log == [
        "measure:0,1,2",
        "edit:0", "measure:0", "edit:1", "measure:1", "edit:2", "measure:2",
        "restore->2", "restore->1", "restore->0",  # rolled back newest first
    ]
    assert [r.post["memory"] for r in results] == [[0], [0, 1], [0, 1, 2]]
    assert [r.edits_applied for r in results] == [1, 2, 3]
    assert [r.position for r in results] == [0, 1, 2]
    assert editor.memory == []


def test_sequential_after_group_scores_every_record_on_the_final_state():
    editor, recs = FakeEditor(), records(3)
    results = SequentialEdit(3, "after_group").run(editor, recs, FakeEvaluator(), group=0)
    assert editor.log == [
        "measure:0,1,2", "edit:0", "edit:1", "edit:2", "measure:0,1,2",
        "restore->2", "restore->1", "restore->0",
    ]
    assert all(r.post["memory"] == [0, 1, 2] for r in results)
    assert [r.edits_applied for r in results] == [3, 3, 3]


def test_sequential_restores_even_when_scoring_fails():
    class Failing(FakeEvaluator):
        def measure(self, editor, records):
            if editor.memory:
                raise RuntimeError("boom")
            return super().measure(editor, records)

    editor = FakeEditor()
    with pytest.raises(RuntimeError, match="boom"):
        SequentialEdit(2, "after_each").run(editor, records(2), Failing(), group=0)
    assert editor.memory == []


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SequentialEdit(10, "immediately"), "evaluate must be"),
        (lambda: SequentialEdit(0, "after_each"), "group_size"),
        (lambda: BatchEdit(0), "batch_size"),
        (lambda: SingleEdit(0), "chunk_size"),
    ],
)
def test_bad_protocol_settings_fail_clearly(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_sequential_timing_has_no_default():
    with pytest.raises(TypeError):
        SequentialEdit(10)  # the evaluation timing must be chosen explicitly


def test_weights_handle_restores_bit_exactly_and_snapshot_detects_changes():
    import torch

    layer = torch.nn.Linear(4, 3)
    snap = ParameterSnapshot(layer)
    with WeightsHandle([layer.weight]):
        with torch.no_grad():
            layer.weight.add_(1e-7)
        assert snap.differences(layer) == ["weight"]
    assert snap.differences(layer) == []


def test_handle_stack_restores_in_reverse_order():
    order = []
    stack = HandleStack()
    for i in range(3):
        stack.push(CallbackHandle(lambda i=i: order.append(i)))
    stack.restore()
    stack.restore()  # idempotent
    assert order == [2, 1, 0]
