"""ECE (lit_edit/nn/neurons.py, lit_edit/nn/ece_solve.py, lit_edit/methods/ece.py).

The restricted solve writes only the chosen units (every other weight entry bit-identical) and
over all units equals MEMIT's / AlphaEdit's; Jaccard by hand; clustering of two disjoint unit
groups; the scores' orientation on hand-built cases (Conv1D and Linear); on the tiny TinyFacts
model an edit changes only its matrices and restores bit-exactly, in a batch and a sequence.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from solve_helpers import random_layer, seeded

from lit_edit.editing import ParameterSnapshot
from lit_edit.editor import apply_edit, open_sequence
from lit_edit.nn.ece_solve import (
    apply_columns,
    restricted_alphaedit_update,
    restricted_memit_update,
)
from lit_edit.nn.fact_tokens import requests_of
from lit_edit.nn.layout import matrix_layout
from lit_edit.nn.locate import apply_matrix_update
from lit_edit.nn.memit_solve import alphaedit_update, memit_update, nullspace_projector
from lit_edit.nn.neurons import (
    cluster_facts,
    jaccard_matrix,
    neuron_scores,
    select_neurons,
)
from lit_edit.protocols import BatchEdit
from lit_edit.world import load_world, resolve_tinyfacts


def _problem(g: torch.Generator, d_in: int = 10, d_out: int = 4, n: int = 3):
    keys = torch.randn(n, d_in, generator=g)
    residual = torch.randn(n, d_out, generator=g)
    preserved = torch.randn(60, d_in, generator=g)
    earlier = torch.randn(2, d_in, generator=g, dtype=torch.float64)
    return keys, residual, preserved.T @ preserved / 60, earlier.T @ earlier


@pytest.mark.parametrize("kind", ["conv1d", "linear"])
def test_the_restricted_solve_changes_only_the_chosen_units(kind) -> None:
    g = seeded()
    d_in, d_out = 10, 6
    layer = random_layer(kind, d_in, d_out, g)
    layout = matrix_layout("layer.weight", layer)
    keys, residual, moment, earlier = _problem(g, d_in, d_out)
    selected = torch.tensor([1, 4, 7])
    before = layer.weight.detach().clone()
    update = restricted_memit_update(residual, keys, selected, moment, 0.5, earlier)
    assert update.shape == (d_out, 3)
    apply_columns(layer.weight, layout, selected, update)
    changed = layout.from_weight(layer.weight.detach() != before)  # [d_out, d_in]
    assert changed[:, selected].any()
    others = torch.ones(d_in, dtype=torch.bool)
    others[selected] = False
    after = layout.from_weight(layer.weight.detach())[:, others]
    untouched = layout.from_weight(before)[:, others]
    assert torch.equal(after.view(torch.int32), untouched.view(torch.int32))  # bit-identical
    # the optimum of the constrained problem: its gradient vanishes on the chosen columns
    k, r = keys.double(), residual.double()
    full = torch.zeros(d_out, d_in, dtype=torch.float64)
    full[:, selected] = update
    grad = (full @ k.T - r.T) @ k + full @ (0.5 * moment.double() + earlier)  # [d_out, d_in]
    assert grad[:, selected].abs().max() < 1e-9


def test_the_restricted_solve_over_all_units_is_memits_and_alphaedits() -> None:
    g = seeded(1)
    keys, residual, moment, earlier = _problem(g)
    every = torch.arange(keys.shape[1])
    torch.testing.assert_close(restricted_memit_update(residual, keys, every, moment, 2.0,
                                                       earlier),
                               memit_update(residual, keys, moment, 2.0, earlier),
                               atol=0, rtol=0)
    projector, dim = nullspace_projector(moment, 0.05, "max")
    update, restricted_dim = restricted_alphaedit_update(residual, keys, every, moment, 0.05,
                                                         "max", 1.0, earlier)
    assert restricted_dim == dim
    torch.testing.assert_close(update, alphaedit_update(residual, keys, projector, 1.0, earlier),
                               atol=0, rtol=0)
    for kind in ("conv1d", "linear"):  # applied: the same weights as MEMIT's full update
        a, b = random_layer(kind, 10, 4, seeded(2)), random_layer(kind, 10, 4, seeded(2))
        full = memit_update(residual, keys, moment, 2.0, earlier)
        apply_matrix_update(a.weight, matrix_layout("w", a), full)
        apply_columns(b.weight, matrix_layout("w", b), every, full)
        assert torch.equal(a.weight, b.weight)


def test_the_restricted_alphaedit_solve_leaves_preserved_keys_unchanged() -> None:
    g = seeded(3)
    d_in, d_out = 12, 5
    layer = random_layer("conv1d", d_in, d_out, g)
    basis = torch.randn(d_in, 5, generator=g)
    preserved = (basis @ torch.randn(5, 80, generator=g)).T  # rank 5
    keys, residual = torch.randn(3, d_in, generator=g), torch.randn(3, d_out, generator=g)
    selected = torch.tensor([0, 2, 3, 5, 6, 8, 9, 11])  # 8 of 12 units, rank 5 inside them
    update, dim = restricted_alphaedit_update(residual, keys, selected,
                                              preserved.T @ preserved / 80, 1e-6, "max", 0.1)
    assert dim == 3
    with torch.no_grad():
        before = layer(preserved)
        apply_columns(layer.weight, matrix_layout("w", layer), selected, update)
        torch.testing.assert_close(layer(preserved), before, atol=1e-4, rtol=0)


def test_jaccard_by_hand() -> None:
    sets = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    expected = torch.tensor([[1, 1 / 3, 1, 0], [1 / 3, 1, 1 / 3, 0], [1, 1 / 3, 1, 0],
                             [0, 0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(jaccard_matrix(sets), expected)


def test_clustering_finds_two_disjoint_unit_groups() -> None:
    g = seeded(4)
    d = 40
    sets = torch.zeros(10, d, dtype=torch.bool)
    for i in range(10):  # facts 0, 2, 4, ... use units 0-19, the others units 20-39
        base = 0 if i % 2 == 0 else 20
        sets[i, base + torch.randperm(20, generator=g)[:8]] = True
    clusters = cluster_facts(sets, 2, seed=0)
    assert clusters == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    assert cluster_facts(sets, 2, seed=0) == clusters  # seeded
    assert cluster_facts(sets, 1) == [list(range(10))]


@pytest.mark.parametrize("kind", ["conv1d", "linear"])
def test_scores_are_oriented_by_input_unit(kind) -> None:
    d_k, d_out = 6, 3  # Conv1D stores [d_k, d_out]: the release's scores came out [d_out]
    layer = random_layer(kind, d_k, d_out, seeded(5))
    layout = matrix_layout("w", layer)
    with torch.no_grad():
        w = torch.full((d_out, d_k), 0.1)
        w[:, 4] = 2.0  # unit 4 has by far the largest outgoing column
        layer.weight.copy_(layout.to_weight(w))
    weight = layout.from_weight(layer.weight)
    keys = torch.tensor([[0.0, 3.0, 0.0, 0.0, 0.5, 0.0], [0.0, -0.1, 0.0, -2.0, 0.0, 0.1]])
    top = lambda s: s.argmax(-1).tolist()  # noqa: E731
    assert neuron_scores("weight_l1", keys, weight).shape == (2, d_k)
    assert top(neuron_scores("weight_l1", keys, weight)) == [4, 4]
    assert top(neuron_scores("activation", keys, weight)) == [1, 3]  # |k|: the sign is ignored
    # |k_i| Σ_o |W[o, i]|: fact 0 unit 1 gives 3 · 0.3 = 0.9 < unit 4's 0.5 · 6 = 3
    assert top(neuron_scores("act_x_weight", keys, weight)) == [4, 3]
    # a linear head y = W k with loss −y[0]: ∂/∂k = −W[0]; |k · g| picks the contribution
    grads = -weight[0].expand(2, d_k)
    assert top(neuron_scores("grad_x_act", keys, weight, grads)) == [4, 3]
    with pytest.raises(ValueError, match="grad_x_act"):
        neuron_scores("grad_x_act", keys, weight)
    with pytest.raises(ValueError, match="d_k"):
        neuron_scores("activation", keys, weight.T)


def test_selection_rules() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.1], [4.0, 3.0, 2.0, 1.0]])
    assert select_neurons(scores, "top_k", 2).tolist() == [[False, True, True, False],
                                                           [True, True, False, False]]
    assert select_neurons(scores, "fraction", 0.25).sum(-1).tolist() == [1, 1]
    # top-p 0.8: the longest top prefix whose cumulative share is ≤ 0.8
    assert select_neurons(scores, "top_p", 0.8).tolist() == [[False, True, True, False],
                                                             [True, True, False, False]]
    with pytest.raises(ValueError, match="top_k"):
        select_neurons(scores, "top_k", 0.5)


# --------------------------------------------------------------------------- tiny model editor
@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return load_world(resolve_tinyfacts("tinyfacts"))


@pytest.fixture(scope="module")
def records(world):
    return world.edit_records(4, seed=5)


def _editor(tmp_path: Path, world, records, **kwargs):
    from lit_edit.methods import ECEEditor

    subjects = [r.subject for r in records]
    texts = world.pretraining_texts()
    corpus = texts[:400] + [t for t in texts[400:] if any(s in t for s in subjects)]
    path = tmp_path.parent / f"{tmp_path.name}-corpus.txt"
    path.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    settings = {"layers": [0], "steps": 10, "prefix_lengths": [], "mom2_update_weight": 10.0,
                "stats_dir": str(tmp_path), "mom2_corpus": str(path), "n_clusters": 2}
    return ECEEditor(backbone="tinyfacts", **{**settings, **kwargs})


def _scores(editor, pairs) -> torch.Tensor:
    return torch.stack([s.logprobs.sum() for s in editor.score_pairs(pairs)])


@pytest.mark.parametrize("settings", [
    {},  # the paper's reconstruction: grad × act, clusters, union, MEMIT solve
    {"neuron_score": "activation", "neuron_rule": "top_p", "neuron_amount": 0.8,
     "neuron_pooling": "sum", "n_clusters": 1},  # the release
    {"neuron_score": "act_x_weight", "solver": "alphaedit", "l2": 1.0,
     "nullspace_rule": "energy"},
])
def test_an_edit_writes_only_the_chosen_units_and_restores_bit_exactly(
    settings, tmp_path, world, records
) -> None:
    editor = _editor(tmp_path, world, records, **settings)
    name = "model.transformer.h.0.mlp.c_proj.weight"
    assert editor.edit_state_keys() == {name}
    BatchEdit(batch_size=4).check(editor)
    pairs = [r.edit_pair for r in records]
    before, scores = ParameterSnapshot(editor), _scores(editor, pairs)
    weight = editor.model.transformer.h[0].mlp.c_proj.weight
    original = weight.detach().clone()
    handle = apply_edit(editor, records)
    assert sorted(before.differences(editor)) == [name]
    rows_changed = (weight.detach() != original).any(-1)  # Conv1D [d_k, d_out]: unit rows
    values = editor.record_values(records[:1])[0]
    assert 0 < int(rows_changed.sum()) <= 512 * 0.8 + 1
    assert values["ece/units/transformer.h.0.mlp.c_proj"] < 512
    edited = _scores(editor, pairs)
    handle.restore()
    assert edited.mean() > scores.mean()
    assert before.differences(editor) == []
    assert torch.equal(_scores(editor, pairs), scores)
    assert len(editor.edit_keys) == 0


def test_all_units_one_cluster_is_memit(tmp_path, world, records) -> None:
    from lit_edit.methods import MEMITEditor

    ece = _editor(tmp_path, world, records, neuron_score="none", n_clusters=1,
                  accumulate_keys=False)
    memit = MEMITEditor(backbone="tinyfacts", layers=[0], steps=10, prefix_lengths=[],
                        mom2_update_weight=10.0, stats_dir=str(tmp_path),
                        mom2_corpus=str(tmp_path.parent / f"{tmp_path.name}-corpus.txt"))
    weight = [e.model.transformer.h[0].mlp.c_proj.weight for e in (ece, memit)]
    with apply_edit(ece, records), apply_edit(memit, records):
        torch.testing.assert_close(weight[0], weight[1], atol=1e-6, rtol=1e-5)


def test_sequential_batches_keep_earlier_keys_and_roll_back_exactly(
    tmp_path, world, records
) -> None:
    editor = _editor(tmp_path, world, records, mom2_exclude_subject=False)
    before = ParameterSnapshot(editor)
    with open_sequence(editor) as sequence:
        sequence.push(apply_edit(editor, records[:2]))
        assert len(editor.edit_keys) == 1
        sequence.push(apply_edit(editor, records[2:]))
        assert len(editor.edit_keys) == 2
    assert len(editor.edit_keys) == 0
    assert before.differences(editor) == []


def test_batch_targets_are_computed_once_before_the_batch(tmp_path, world, records) -> None:
    """``targets: batch``: one target loop on the unedited model; each cluster takes its rows."""
    one = {"n_clusters": 1, "mom2_exclude_subject": False}
    weights = []
    for targets in ("per_cluster", "batch"):  # one cluster: the two rules are the same edit
        editor = _editor(tmp_path, world, records, targets=targets, **one)
        with apply_edit(editor, records):
            weights.append(editor.model.transformer.h[0].mlp.c_proj.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])

    editor = _editor(tmp_path, world, records, targets="batch", mom2_exclude_subject=False)
    requests = requests_of(records)
    expected = editor._targets(requests)  # [4, d] on the unedited model
    seen: list[tuple[list[str], torch.Tensor]] = []
    calls = []
    solve, compute = editor._edit_cluster, editor._targets
    editor._edit_cluster = lambda facts, targets, *rest: (
        seen.append(([f.subject for f in facts], targets)), solve(facts, targets, *rest))
    editor._targets = lambda facts: (calls.append(len(facts)), compute(facts))[1]
    with apply_edit(editor, records):
        pass
    assert calls == [len(records)] and len(seen) == 2  # one loop, two clusters
    row = {r.subject: i for i, r in enumerate(requests)}
    for subjects, targets in seen:
        assert torch.equal(targets, expected[[row[s] for s in subjects]])


def test_bad_settings_are_refused(tmp_path, world, records) -> None:
    with pytest.raises(ValueError, match="neuron_amount"):
        _editor(tmp_path, world, records, neuron_rule="top_k", neuron_amount=0.5)
    with pytest.raises(ValueError, match="solver"):
        _editor(tmp_path, world, records, solver="rome")
    with pytest.raises(ValueError, match="targets"):
        _editor(tmp_path, world, records, targets="each")
