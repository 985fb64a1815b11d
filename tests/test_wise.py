"""WISE: side memory, masks, clamp, router, Ties merging, shard/merge schedule, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_edit.backbone import Backbone
from lit_edit.editing import ParameterSnapshot
from lit_edit.editor import apply_edit
from lit_edit.methods import WISEEditor
from lit_edit.nn.layout import matrix_layout
from lit_edit.nn.wise_memory import ORIGINAL, SIDE, SideMemory
from lit_edit.nn.wise_merge import ties_merge
from lit_edit.nn.wise_routing import margin_loss, positive_mean, sequence_distance
from lit_edit.records import QAPair
from lit_edit.world import load_world, resolve_tinyfacts

SMALL = dict(n_iter=4, save_freq=2, merge_freq=4, act_ratio=0.8)


@pytest.fixture(scope="module")
def records():
    return load_world(resolve_tinyfacts("tinyfacts")).edit_records(8, seed=5)


@pytest.fixture(scope="module")
def base_model():
    return Backbone.of("tinyfacts").load_model()


def make(**kwargs) -> WISEEditor:
    return WISEEditor(**{**SMALL, **kwargs}).eval()


def pairs_of(records) -> list[QAPair]:
    return [p for r in records for p in (r.edit_pair, *r.rephrase_pairs,
                                         *(q for g in r.locality.values() for q in g))]


def logits(model, editor, pairs):
    batch = editor.collator(pairs)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------------- parts
def test_untouched_side_memory_is_bit_identical_to_the_base(records, base_model) -> None:
    editor = make()
    pairs = pairs_of(records[:3])
    assert torch.equal(logits(editor.model, editor, pairs), logits(base_model, editor, pairs))
    # even routed through the (untouched) side copy: ε = 0 sends every sequence to it
    editor.wise.eps = 0.0
    try:
        assert editor.routes(pairs[:4]) == [SIDE] * 4
        assert torch.equal(logits(editor.model, editor, pairs),
                           logits(base_model, editor, pairs))
    finally:
        editor.wise.eps = None


def test_linear_layer_side_output_and_routing() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    memory = SideMemory(layer, matrix_layout("weight", layer), distance="delta",
                        act_ratio=1.0, save_freq=10, merge_freq=10)
    model = nn.Sequential(layer)
    memory.attach(model)
    x = torch.randn(3, 5, 6)
    assert torch.equal(model(x), layer.forward(x))  # nothing in effect
    with torch.no_grad():
        memory.side[0, 0] += 10.0  # sequences with x[..., 0] far from 0 move most
    memory.eps = 10.0 * x[0, :, 0].abs().mean().item()  # row 0's own distance
    out = model(x)
    routes = memory.last_routes.tolist()
    assert routes[0] == SIDE
    for i, route in enumerate(routes):
        expected = memory.output(memory.side, x[i]) if route == SIDE else layer.forward(x[i])
        assert torch.allclose(out[i], expected)
    d = sequence_distance((memory.output(memory.side, x) - layer.forward(x)).norm(dim=-1), None)
    assert routes == [SIDE if v >= memory.eps else ORIGINAL for v in d.tolist()]


def test_margin_loss_by_hand() -> None:
    assert positive_mean(torch.tensor([-1.0, 2.0, 4.0])).item() == 3.0
    assert positive_mean(torch.tensor([-1.0])).item() == 0.0
    inside, outside = torch.tensor([25.0, 12.0]), torch.tensor([7.0])
    # gap: 7-25+10=-8 (dropped), 7-12+10=5; out-α: 2; β-in: -5 (dropped), 8
    assert margin_loss(inside, outside, 5.0, 20.0, 10.0).item() == pytest.approx(5 + 2 + 8)


def test_ties_merge_equals_the_hand_computed_result() -> None:
    a = torch.tensor([4.0, -1.0, 0.5, 3.0])
    b = torch.tensor([2.0, 3.0, -0.2, -1.0])
    # density 0.5 keeps the 2 largest magnitudes: a -> [4, 0, 0, 3], b -> [2, 3, 0, 0]
    # weights 0.5 each: weighted a [2, 0, 0, 1.5], b [1, 1.5, 0, 0]; elected signs all +
    # disjoint weighted mean: [(2+1)/(0.5+0.5), 1.5/0.5, 0, 1.5/0.5] = [3, 3, 0, 3]
    merged = ties_merge([a, b], [0.5, 0.5], density=0.5)
    assert torch.allclose(merged, torch.tensor([3.0, 3.0, 0.0, 3.0]))
    # peft's own normalisation divides by the count of agreeing entries instead
    counted = ties_merge([a, b], [0.5, 0.5], density=0.5, normalise="count")
    assert torch.allclose(counted, torch.tensor([1.5, 1.5, 0.0, 1.5]))
    # sign election: entry 0 is +4·0.5 vs -6·0.5 -> negative wins, only b's value is kept
    c, d = torch.tensor([4.0, 1.0]), torch.tensor([-6.0, 1.0])
    assert torch.allclose(ties_merge([c, d], [0.5, 0.5], density=1.0), torch.tensor([-6.0, 1.0]))
    with pytest.raises(ValueError, match="weights"):
        ties_merge([a, b], [1.0], density=0.5)


def test_bad_settings_fail_clearly() -> None:
    with pytest.raises(ValueError, match="multiple of save_freq"):
        make(save_freq=3, merge_freq=4)
    with pytest.raises(ValueError, match="mode"):
        make(mode="both")
    with pytest.raises(ValueError, match="irrelevant"):
        make(irrelevant="nq")
    with pytest.raises(ValueError, match="n_irrelevant"):
        make(n_irrelevant=0)


# ---------------------------------------------------------------------- editing
def test_gradients_reach_only_masked_entries_and_the_clamp_holds(records) -> None:
    editor = make(n_iter=6, edit_lr=50.0, norm_constraint=0.01)
    memory = editor.wise
    w0 = memory.original.detach().clone()
    with apply_edit(editor, records[:1]):
        delta = memory.side - w0
        assert torch.count_nonzero(delta[~memory.mask]) == 0
        assert torch.count_nonzero(delta[memory.mask]) > 0
        assert delta.abs().max().item() <= 0.01 + 1e-6
        assert delta.abs().max().item() == pytest.approx(0.01, rel=1e-4)  # it bites
    assert torch.equal(memory.side, w0)
    assert torch.equal(memory.original, w0)  # the backbone's weight never changes


def test_router_sends_the_edit_to_side_memory_and_locality_to_main(records) -> None:
    editor = make(n_iter=40, edit_lr=1.0)
    record = records[0]
    with apply_edit(editor, [record]):
        assert editor.routes([record.edit_pair]) == [SIDE]
        unrelated = [p for r in records[4:] for g in r.locality.values() for p in g]
        routes = editor.routes(unrelated)
        assert routes.count(ORIGINAL) >= 0.8 * len(routes)
        values = editor.record_values([record])[0]
        assert values["routing/edit/side"] == 1.0
    assert editor.routes([record.edit_pair]) == [ORIGINAL]


@pytest.mark.parametrize("mode", ["merge", "retrieve"])
def test_sharding_and_merging_follow_the_edit_counter_only(records, mode) -> None:
    editor = make(mode=mode, n_iter=2)
    memory = editor.wise
    first_mask = memory.mask.clone()
    editor.edit(records[:1])
    assert memory.edits == 1 and memory.memories == [] and memory.eps is not None
    for _ in range(3):  # evaluation never shards nor merges
        editor.score_pairs(pairs_of(records[:2]))
        editor.record_values(records[:2])
    assert memory.edits == 1 and memory.memories == [] and memory.merges == 0
    editor.edit(records[1:2])  # edit 2: shard saved, side reset, new mask
    assert len(memory.memories) == 1 and memory.eps is None
    assert torch.equal(memory.side, memory.original)
    assert not torch.equal(memory.mask, first_mask)
    editor.edit(records[2:4])  # edits 3, 4: second shard, then the merge
    assert memory.merges == 1 and memory.edits == 4
    if mode == "merge":
        assert memory.memories == [] and memory.merged is not None
        w0 = memory.original
        assert not torch.equal(memory.merged, w0)
    else:
        assert len(memory.memories) == 1 and memory.merged is None
    for _ in range(2):
        editor.score_pairs(pairs_of(records[:2]))
    assert memory.merges == 1 and memory.edits == 4


def test_restore_is_exact_across_shards_and_merges(records) -> None:
    editor = make(n_iter=2)
    snapshots, handles = [], []
    for record in records[:5]:  # crosses two shard saves and one merge
        snapshots.append(ParameterSnapshot(editor))
        handles.append(apply_edit(editor, [record]))
    assert editor.wise.merges == 1
    for snapshot, handle in zip(reversed(snapshots), reversed(handles), strict=True):
        handle.restore()
        assert snapshot.differences(editor) == []
    assert editor.wise.edits == 0 and not editor.wise.in_effect()


def test_state_round_trips_through_a_checkpoint_and_editing_goes_on(records) -> None:
    first = make(n_iter=2)
    for record in records[:3]:
        first.edit([record])
    checkpoint = {"state_dict": first.state_dict()}
    first.on_save_checkpoint(checkpoint)
    saved = set(checkpoint["state_dict"])
    assert saved == {"wise.side", "wise._extra_state"}  # no backbone weight
    second = make(n_iter=2)
    second.on_load_checkpoint(checkpoint)
    second.load_state_dict(checkpoint["state_dict"])
    assert ParameterSnapshot(first).differences(second) == []
    pairs = pairs_of(records[:4])
    a, b = first.score_pairs(pairs), second.score_pairs(pairs)
    assert all(torch.equal(x.logprobs, y.logprobs) for x, y in zip(a, b, strict=True))
    first.edit(records[3:4])  # edit 4: the merge, in both
    second.edit(records[3:4])
    assert second.wise.merges == 1
    assert ParameterSnapshot(first).differences(second) == []


def test_replay_rows_follow_the_shard_are_restored_and_checkpointed(records) -> None:
    editor = make(n_iter=2, replay=1)  # save_freq 2: a shard every second edit
    memory = editor.wise
    first = (records[0].prompt, records[0].target_new)
    h0 = apply_edit(editor, records[:1])
    assert memory.replay == [first]
    assert editor._replayed() == [QAPair(*first)]  # the next edit trains on record 0 again
    h1 = apply_edit(editor, records[1:2])  # the shard is saved: its replay rows go with it
    assert memory.replay == [] and editor._replayed() == []
    apply_edit(editor, records[2:3])
    assert memory.replay == [(records[2].prompt, records[2].target_new)]
    checkpoint = {"state_dict": editor.state_dict()}
    editor.on_save_checkpoint(checkpoint)
    other = make(n_iter=2, replay=1)
    other.on_load_checkpoint(checkpoint)
    other.load_state_dict(checkpoint["state_dict"])
    assert other.wise.replay == memory.replay
    h1.restore()  # back to after edit 1 (the later edit's handle is inside: restore in order)
    assert memory.replay == [first]
    h0.restore()
    assert memory.replay == [] and memory.edits == 0
    with pytest.raises(ValueError, match="replay"):
        make(replay=-1)


def test_a_sequential_group_holds_one_snapshot_of_the_side_memory(records) -> None:
    """Inside an edit sequence only the group's first edit snapshots the side memory."""
    editor = make(n_iter=2)  # save_freq 2, merge_freq 4: the group crosses saves and a merge
    before = ParameterSnapshot(editor)
    with editor.edit_sequence() as sequence:
        for record in records[:5]:
            sequence.push(editor.edit([record]))
        assert editor.wise.merges == 1
        assert len(sequence) == 1  # one snapshot, not one per edit
    assert before.differences(editor) == [] and editor.wise.edits == 0
    handle = editor.edit(records[:1])  # outside a sequence: the edit restores alone
    assert len(handle) == 1
    handle.restore()
    assert before.differences(editor) == []


def test_replaying_the_frozen_part_leaves_every_edit_bit_identical(records, monkeypatch) -> None:
    import contextlib
    import io

    import lit_edit.methods.wise as wise_module

    def edited(editor: WISEEditor) -> bytes:
        """The side memory's whole state (copy, shards, ε's, masks, counters) after 3 edits."""
        for r in records[:3]:
            apply_edit(editor, [r])
        buffer = io.BytesIO()
        torch.save({k: v for k, v in editor.state_dict().items() if k.startswith("wise.")},
                   buffer)
        return buffer.getvalue()

    seen: list = []
    replay = wise_module.replay_frozen

    @contextlib.contextmanager
    def counted(*args):
        """``replay_frozen``, its replays kept."""
        with replay(*args) as replays:
            yield replays
        seen.append([r.replays for r in replays])

    monkeypatch.setattr(wise_module, "replay_frozen", counted)
    replayed = edited(make(**SMALL))
    # block 0, block 1's attention and c_fc: replayed at the 3 later of 4 steps, every edit
    assert seen == [[3, 3, 3]] * 3
    monkeypatch.setattr(wise_module, "replay_frozen", lambda *a: contextlib.nullcontext())
    plain = edited(make(**SMALL))
    assert replayed == plain  # byte for byte
    assert plain != edited(make(**{**SMALL, "n_iter": 3}))  # the bytes do tell edits apart


def test_template_negatives_swap_the_subject_for_made_up_names(records) -> None:
    import dataclasses

    editor = make(template_negatives=3)
    record = records[0]
    head, _, tail = record.prompt.partition(record.subject)
    rows = editor._template_negatives(record)
    assert len(rows) == 3 and len({r.prompt for r in rows}) == 3
    for row in rows:
        assert row.prompt.startswith(head) and row.prompt.endswith(tail)
        middle = row.prompt[len(head): len(row.prompt) - len(tail)]
        assert middle != record.subject and len(middle.split()) == 2
    assert editor._template_negatives(record) == rows  # seeded by the edit counter
    assert make()._template_negatives(record) == []
    with pytest.raises(ValueError, match="no subject in its prompt"):
        editor._template_negatives(dataclasses.replace(record, subject=None))
