"""Parallel single edits (``SingleEdit(parallel=K)``) give the one-by-one protocol's values.

K records are edited independently at once and each is scored under its own edit only; every
record's values and every scored log-probability must match the one-by-one protocol's within
float tolerance (weight edits compute ``W x + D x`` instead of ``(W + D) x``), and the editor
must come back bit-exactly.
"""

from __future__ import annotations

import pytest
import torch
from test_editor_contract import build

from lit_edit.editing import ParameterSnapshot
from lit_edit.evaluation import Evaluation, RecordEvaluator
from lit_edit.methods import FTEditor, IKEEditor, LTEEditor, MENDEditor, NoEdit
from lit_edit.nn.row_deltas import RowDeltas
from lit_edit.protocols import SingleEdit
from lit_edit.world import load_world, resolve_tinyfacts


@pytest.fixture(scope="module")
def records():
    return load_world(resolve_tinyfacts("tinyfacts")).edit_records(7, seed=11)


def _run(editor, records, parallel):
    evaluator = RecordEvaluator(Evaluation(exact_match=True))
    with torch.inference_mode():  # as Lightning's test loop runs the protocols
        return SingleEdit(parallel=parallel).run(editor, records, evaluator, group=0)


@pytest.mark.parametrize("cls", [FTEditor, MENDEditor, IKEEditor, LTEEditor, NoEdit],
                         ids=lambda c: c.__name__)
def test_parallel_equals_one_by_one(cls, records) -> None:
    editor = build(cls)
    if isinstance(editor, FTEditor):
        editor.steps = 8  # enough to move the edit; keeps the test fast
    if isinstance(editor, MENDEditor):  # an untrained network is the identity: a gradient step
        with torch.no_grad():
            editor.network.edit_lrs.fill_(5e-2)
    snapshot = ParameterSnapshot(editor)
    one = _run(editor, records, 1)
    par = _run(editor, records, 3)  # 7 records: chunks of 3, 3 and 1
    assert snapshot.differences(editor) == []
    moved = 0
    for a, b in zip(one, par, strict=True):
        assert a.post.keys() == b.post.keys()
        for key, value in a.post.items():
            if value is None:
                assert b.post[key] is None
            else:
                assert b.post[key] == pytest.approx(value, abs=1e-6), key
        for x, y in zip([a.post_measure.edit, *a.post_measure.rephrase],
                        [b.post_measure.edit, *b.post_measure.rephrase], strict=True):
            torch.testing.assert_close(y.logprobs, x.logprobs, rtol=1e-4, atol=1e-4)
        moved += not torch.equal(a.post_measure.edit.logprobs, a.pre_measure.edit.logprobs)
    if not isinstance(editor, NoEdit):
        assert moved == len(records)  # the edits did something


def test_row_deltas_give_each_row_its_own_matrix() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3, bias=False)
    from lit_edit.nn.layout import matrix_layout

    deltas = torch.randn(2, 3, 4)
    rows = RowDeltas({"l": (layer, matrix_layout("l.weight", layer))}, {"l": deltas})
    x = torch.randn(3, 5, 4)  # 3 rows
    with torch.no_grad(), rows.rows([1, 0, 1]):
        y = layer(x)
    for b, k in enumerate([1, 0, 1]):
        expected = x[b] @ (layer.weight + deltas[k]).T
        torch.testing.assert_close(y[b], expected)
    with pytest.raises(ValueError, match="owners must be in"):
        with rows.rows([2]):
            pass
    assert not layer._forward_hooks  # the hooks are removed


def test_row_deltas_with_a_subset_of_the_edits_on_a_conv1d() -> None:
    """Rows of only some edits, repeated and out of order, through GPT-2's Conv1D layout."""
    from transformers.pytorch_utils import Conv1D

    from lit_edit.nn.layout import matrix_layout

    torch.manual_seed(1)
    layer = Conv1D(3, 4)  # weight [d_in 4, d_out 3]
    deltas = torch.randn(4, 4, 3)  # 4 edits
    rows = RowDeltas({"l": (layer, matrix_layout("l.weight", layer))}, {"l": deltas})
    owners = [3, 1, 3, 3]  # edits 0 and 2 absent; edit 3 owns three rows
    x = torch.randn(4, 2, 4)
    with torch.no_grad(), rows.rows(owners):
        y = layer(x)
    for b, k in enumerate(owners):
        expected = x[b] @ (layer.weight + deltas[k]) + layer.bias
        torch.testing.assert_close(y[b], expected)


def test_editors_without_parallel_edits_are_refused() -> None:
    class Plain:
        max_edits_per_call = None

    with pytest.raises(ValueError, match="no parallel single edits"):
        SingleEdit(parallel=4).check(Plain())
    SingleEdit(parallel=1).check(Plain())


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_low_rank_row_deltas_equal_their_dense_updates(conv1d: bool) -> None:
    """Factored updates ``(x Lᵀ) R`` give each row what the dense ``Lᵀ R`` stack gives."""
    from transformers.pytorch_utils import Conv1D

    from lit_edit.nn.layout import matrix_layout
    from lit_edit.nn.row_deltas import LowRank

    torch.manual_seed(2)
    layer = Conv1D(12, 10) if conv1d else torch.nn.Linear(10, 12)  # d_in 10, d_out 12
    factors = LowRank(torch.randn(3, 2, 10), torch.randn(3, 2, 12))  # 3 edits of rank 2
    assert not factors.cheaper_dense()  # 2 · 22 < 120: stays factored
    by_hand = [factors.left[k].T @ factors.right[k] for k in range(3)]  # [d_in, d_out]
    layout = {"l": (layer, matrix_layout("l.weight", layer))}
    factored = RowDeltas(layout, {"l": factors})
    assert isinstance(factored.deltas["l"], LowRank)
    dense = RowDeltas(layout, {"l": factors.dense(not conv1d)})
    x = torch.randn(4, 3, 10)
    for owners in ([2, 0, 2, 1], [2, 2, 0, 0]):  # every edit, and a subset of them
        with torch.no_grad(), factored.rows(owners):
            y = layer(x)
        with torch.no_grad(), dense.rows(owners):
            y_dense = layer(x)
        torch.testing.assert_close(y, y_dense)
        with torch.no_grad():
            base = layer(x)
        for b, k in enumerate(owners):
            torch.testing.assert_close(y[b], base[b] + x[b] @ by_hand[k])
    high = LowRank(torch.randn(2, 8, 10), torch.randn(2, 8, 12))  # 8 · 22 > 120
    assert high.cheaper_dense()
    assert not isinstance(RowDeltas(layout, {"l": high}).deltas["l"], LowRank)
    with pytest.raises(ValueError, match="LowRank needs"):
        LowRank(torch.randn(2, 3, 10), torch.randn(2, 4, 12))
