"""Memory over long sequential runs: one copy per group, nothing left alive after the rollback.

The sequential protocol's group is an :class:`~lit_edit.editing.EditSequence`: an editor that
changes weights in place keeps one copy of them for the whole group (not one per edit), and after
the group is rolled back no hook, handle, copy or autograd graph of its edits is alive.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from test_editor_contract import EDITORS, build
from torch import nn

from lit_edit.editing import CoveredEdit, EditorSequences, EditSequence, ParameterSnapshot
from lit_edit.editor import open_sequence
from lit_edit.methods.base import EditorModule
from lit_edit.protocols import SequentialEdit
from lit_edit.world import load_world, resolve_tinyfacts


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python objects (after a gc)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # torch.is_tensor on deprecated torch objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if torch.is_tensor(obj) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def hooks_of(module: nn.Module) -> list[tuple[str, int]]:
    """``(name, number of hooks)`` of the submodules with any forward, pre-forward or backward
    hook registered."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    counts = [(name, sum(len(getattr(sub, kind, None) or {}) for kind in kinds))
              for name, sub in module.named_modules()]
    return [(name, n) for name, n in counts if n]


class Probe:
    """A :class:`~lit_edit.protocols.Measurer` that measures memory instead of scoring.

    Its first call is the protocol's pre-edit scoring, its second (``after_group``) the
    scoring after the group's last edit: ``held`` is what the group's edits keep alive then.
    """

    def __init__(self) -> None:
        self.live: list[int] = []

    def measure(self, editor: Any, records: Sequence[Any], parallel: bool = False) -> list[Any]:
        """Record the live tensor bytes; no scores."""
        self.live.append(live_tensor_bytes())
        return [None] * len(records)

    def values(self, pre: Any, post: Any, is_pre: bool = False) -> dict[str, float | None]:
        """No metric values."""
        return {}

    @property
    def held(self) -> int:
        """Bytes alive after the group's last edit that were not before its first."""
        return self.live[1] - self.live[0]


@pytest.fixture(scope="module")
def records():
    return load_world(resolve_tinyfacts("tinyfacts")).edit_records(12, seed=11)


# ------------------------------------------------------------------ the sequence itself
def test_a_sequence_copies_each_parameter_once_and_restores_bit_exactly() -> None:
    layer = nn.Linear(8, 4)
    owner = EditorSequences()
    before = ParameterSnapshot(layer)
    sequence = owner.open()
    sizes = []
    for step in range(5):
        handle = owner.weights_handle([layer.weight, layer.weight])  # duplicates: one copy
        assert isinstance(handle, CoveredEdit) and handle.saved_bytes == 0
        sequence.push(handle)
        with torch.no_grad():
            layer.weight.add_(step + 1.0)
        sizes.append(sequence.saved_bytes)
    assert sizes == [layer.weight.nbytes] * 5  # one copy, whatever the number of edits
    assert len(sequence) == 1
    sequence.push(owner.weights_handle([layer.bias]))  # a newly edited parameter: one more
    assert sequence.saved_bytes == layer.weight.nbytes + layer.bias.nbytes
    sequence.restore()
    assert before.differences(layer) == []
    assert sequence.saved_bytes == 0 and len(sequence) == 0


def test_a_covered_edit_is_undone_with_its_sequence_only() -> None:
    layer = nn.Linear(3, 3)
    owner = EditorSequences()
    sequence = owner.open()
    handle = owner.weights_handle([layer.weight])
    with pytest.raises(RuntimeError, match="restore the sequence"):
        handle.restore()
    sequence.restore()
    handle.restore()  # a no-op now
    with pytest.raises(RuntimeError, match="was restored"):
        sequence.cover([layer.weight])
    # the sequence is closed: edits get their own copies again (single/batch protocols)
    plain = owner.weights_handle([layer.weight])
    assert not isinstance(plain, CoveredEdit) and plain.saved_bytes == layer.weight.nbytes


def test_mixed_handles_restore_in_the_order_they_were_taken() -> None:
    """An own copy taken before the sequence's (or after) still restores bit-exactly."""
    from lit_edit.editing import WeightsHandle

    layer = nn.Linear(3, 3)
    start = layer.weight.detach().clone()
    owner = EditorSequences()
    with owner.open() as sequence:
        sequence.push(WeightsHandle([layer.weight]))  # an editor without weights_handle
        with torch.no_grad():
            layer.weight.add_(1.0)
        sequence.push(owner.weights_handle([layer.weight]))
        with torch.no_grad():
            layer.weight.mul_(3.0)
        sequence.push(WeightsHandle([layer.weight]))
        with torch.no_grad():
            layer.weight.sub_(7.0)
    assert torch.equal(layer.weight, start)


def test_nested_sequences_each_restore_their_own_start() -> None:
    layer = nn.Linear(2, 2)
    start = layer.weight.detach().clone()
    owner = EditorSequences()
    outer = owner.open()
    outer.push(owner.weights_handle([layer.weight]))
    with torch.no_grad():
        layer.weight.add_(1.0)
    middle = layer.weight.detach().clone()
    inner = owner.open()
    inner.push(owner.weights_handle([layer.weight]))
    with torch.no_grad():
        layer.weight.add_(1.0)
    inner.restore()
    assert torch.equal(layer.weight, middle)
    outer.restore()
    assert torch.equal(layer.weight, start)


def test_the_copies_are_freed_when_the_sequence_is_restored() -> None:
    layer = nn.Linear(16, 16)
    owner = EditorSequences()
    sequence = owner.open()
    sequence.push(owner.weights_handle([layer.weight]))
    copies = [weakref.ref(t) for h in sequence._handles for _, t in h._saved]
    assert copies and all(c() is not None for c in copies)
    sequence.restore()
    gc.collect()
    assert all(c() is None for c in copies)


def test_an_editor_without_sequences_gets_a_handle_stack() -> None:
    class Bare:
        def edit(self, records):  # pragma: no cover - never called
            raise AssertionError

    stack = open_sequence(Bare())
    assert not isinstance(stack, EditSequence)
    assert len(stack) == 0


# ------------------------------------------------------------------ real editors, real protocol
@pytest.mark.parametrize("cls", EDITORS, ids=lambda c: c.__name__)
def test_nothing_of_a_sequential_group_is_alive_after_its_rollback(cls, records) -> None:
    """No hook, handle, copy or graph outlives the group; a repeated group holds no more."""
    editor: EditorModule = build(cls)
    before = ParameterSnapshot(editor)
    hooks_before = hooks_of(editor)  # an editor's own, permanent wrapping (WISE) is not a leak
    handles: list[weakref.ref] = []
    edit = editor.edit

    def spy(batch):
        """The editor's edit, with a weak reference to every handle it returns."""
        handle = edit(batch)
        handles.append(weakref.ref(handle))
        return handle

    editor.edit = spy
    protocol = SequentialEdit(group_size=2, evaluate="after_group")
    group = records[:2]
    with torch.inference_mode():
        protocol.run(editor, group, Probe(), group=0)  # warm-up: caches, second moments
        settled = live_tensor_bytes()
        protocol.run(editor, group, Probe(), group=1)
    assert before.differences(editor) == []  # rolled back bit-exactly
    assert hooks_of(editor) == hooks_before  # no hook of an edit is left
    gc.collect()
    assert handles and all(h() is None for h in handles), "an edit handle is still referenced"
    assert live_tensor_bytes() <= settled  # the second group left nothing behind
    assert all(s.restored for s in editor._sequences._open)  # no sequence left open


@pytest.mark.parametrize("name", ["FTEditor", "MENDEditor"])
def test_a_sequential_group_holds_one_copy_whatever_its_length(name, records) -> None:
    """Weights edited 2 or 12 times in a group: one copy of the edited matrices is kept.

    Before edit sequences, every edit's handle cloned the edited matrices: 12 edits held 12
    copies until the rollback (peak RSS growing linearly with T).
    """
    cls = next(c for c in EDITORS if c.__name__ == name)
    editor = build(cls)
    edited = sum(v.nbytes for k, v in editor.state_dict().items()
                 if k in editor.edit_state_keys())
    held = {}
    with torch.inference_mode():
        SequentialEdit(2, "after_group").run(editor, records[:2], Probe(), group=0)  # warm-up
        for t in (2, 12):
            probe = Probe()
            SequentialEdit(t, "after_group").run(editor, records[:t], probe, group=0)
            held[t] = probe.held
    assert abs(held[2] - edited) < 0.25 * edited, (held, edited)
    assert held[12] - held[2] < 0.25 * edited, (held, edited)


@pytest.mark.parametrize("failing", [1, 3])
def test_a_failing_edit_is_rolled_back_with_its_group(failing, records, monkeypatch) -> None:
    """The group's copy is taken before an edit changes anything, so an edit that fails half
    way (weights already changed, no handle returned) is undone by the group's rollback; with
    a handle per edit, a failing first edit left its change in place."""
    import lit_edit.methods.ft as ft

    editor = build(next(c for c in EDITORS if c.__name__ == "FTEditor"))
    before = ParameterSnapshot(editor)
    calls = []
    real = ft.optimise

    def flaky(params, *args, **kwargs):
        """The real optimisation, except that one edit fails after changing weights."""
        calls.append(1)
        if len(calls) == failing:
            with torch.no_grad():
                for p in params:
                    p.add_(1.0)
            raise RuntimeError("edit failed half way")
        return real(params, *args, **kwargs)

    monkeypatch.setattr(ft, "optimise", flaky)
    with pytest.raises(RuntimeError, match="half way"), torch.inference_mode():
        SequentialEdit(4, "after_each").run(editor, records[:4], Probe(), group=0)
    assert len(calls) == failing
    assert before.differences(editor) == []
