"""MEMIT and AlphaEdit (lit_edit/nn/memit_solve.py, lit_edit/methods/{memit,alphaedit}.py).

The least-squares update equals an independent direct solve, and with λ → 0 writes every key
exactly; AlphaEdit's projector annihilates the preserved keys, its update matches the paper's
formula and leaves their outputs unchanged; on a tiny TinyFacts model the edits change only the
configured matrices and restore bit-exactly (batch, and sequential batches with AlphaEdit's
earlier-batch keys).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from solve_helpers import random_layer, seeded

from lit_edit.editing import ParameterSnapshot
from lit_edit.editor import apply_edit, open_sequence
from lit_edit.nn.layout import matrix_layout
from lit_edit.nn.locate import apply_matrix_update
from lit_edit.nn.memit_solve import (
    EditKeys,
    alphaedit_update,
    memit_update,
    nullspace_projector,
)
from lit_edit.protocols import BatchEdit, SequentialEdit
from lit_edit.world import load_world, resolve_tinyfacts


def test_memit_update_equals_a_direct_least_squares_solve() -> None:
    g = seeded()
    d_in, d_out, n, n0, lam = 9, 5, 4, 30, 3.0
    keys = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    residual = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    preserved = torch.randn(n0, d_in, generator=g, dtype=torch.float64)  # K₀ rows
    moment = preserved.T @ preserved / n0
    earlier = torch.randn(3, d_in, generator=g, dtype=torch.float64)  # K_p rows
    update = memit_update(residual, keys, moment, lam, earlier.T @ earlier)
    # min ‖ΔW K − Rᵀ‖² + λ ‖ΔW K₀‖²/N + ‖ΔW K_p‖², as one stacked least-squares problem
    design = torch.cat([keys, (lam / n0) ** 0.5 * preserved, earlier])  # [rows, d_in]
    rhs = torch.cat([residual, torch.zeros(n0 + 3, d_out, dtype=torch.float64)])  # [rows, d_out]
    direct = torch.linalg.lstsq(design, rhs).solution.T  # [d_out, d_in]
    torch.testing.assert_close(update, direct, atol=1e-10, rtol=1e-9)
    assert update.dtype == torch.float64


@pytest.mark.parametrize(("kind", "d_in", "d_out"), [("conv1d", 8, 6), ("linear", 8, 6),
                                                      ("conv1d", 7, 7)])
def test_memit_update_with_tiny_lambda_writes_every_key_exactly(kind, d_in, d_out) -> None:
    g = seeded(1)
    layer = random_layer(kind, d_in, d_out, g)
    layout = matrix_layout("layer.weight", layer)
    keys = torch.randn(3, d_in, generator=g)  # fewer keys than dimensions
    values = torch.randn(3, d_out, generator=g)  # the outputs wanted
    preserved = torch.randn(50, d_in, generator=g)
    moment = preserved.T @ preserved / 50
    with torch.no_grad():
        residual = values - layer(keys)  # [3, d_out]
    apply_matrix_update(layer.weight, layout, memit_update(residual, keys, moment, 1e-9))
    with torch.no_grad():
        torch.testing.assert_close(layer(keys), values, atol=1e-4, rtol=1e-4)


def test_memit_update_with_a_large_lambda_barely_moves_the_preserved_keys() -> None:
    g = seeded(2)
    keys, residual = torch.randn(3, 8, generator=g), torch.randn(3, 4, generator=g)
    preserved = torch.randn(40, 8, generator=g)
    moment = preserved.T @ preserved / 40
    small = memit_update(residual, keys, moment, 1e-6)
    large = memit_update(residual, keys, moment, 1e4)
    moved = (small @ preserved.T.double()).norm()
    assert (large @ preserved.T.double()).norm() < 1e-2 * moved


def _low_rank_keys(g: torch.Generator, d: int, rank: int, n: int) -> torch.Tensor:
    basis = torch.randn(d, rank, generator=g)
    return (basis @ torch.randn(rank, n, generator=g)).T  # [n, d] of rank `rank`


def test_nullspace_projector_annihilates_the_preserved_keys() -> None:
    g = seeded(3)
    d, rank = 12, 7
    preserved = _low_rank_keys(g, d, rank, 200)
    projector, dim = nullspace_projector(preserved.T @ preserved / 200, 1e-6)
    assert dim == d - rank
    p = projector
    torch.testing.assert_close(p @ p, p, atol=1e-10, rtol=0)  # a projector
    torch.testing.assert_close(p, p.T, atol=1e-12, rtol=0)
    assert (preserved.double() @ p).norm() <= 1e-6 * preserved.norm()
    other = torch.randn(d, generator=g).double()  # generic keys keep their null-space part
    assert (p @ other).norm() > 0.1 * other.norm()


def test_nullspace_projector_uses_a_relative_threshold() -> None:
    g = seeded(4)
    d = 10
    preserved = torch.randn(300, d, generator=g) * torch.logspace(0, -3, d)  # spread spectrum
    moment = preserved.T @ preserved / 300
    eigenvalues = torch.linalg.eigvalsh(moment.double())
    _, dim = nullspace_projector(moment, 1e-2)
    assert dim == int((eigenvalues < 1e-2 * eigenvalues.max()).sum())
    _, same = nullspace_projector(moment * 1000.0, 1e-2)  # scale-free
    assert same == dim
    assert 0 < dim < d
    with pytest.raises(ValueError, match="nullspace_threshold"):
        nullspace_projector(moment, 0.0)


def test_the_energy_rule_bounds_the_preserved_keys_energy_in_the_null_space() -> None:
    g = seeded(7)
    d = 16
    preserved = torch.randn(400, d, generator=g, dtype=torch.float64) * torch.logspace(
        1, -2, d, dtype=torch.float64)
    preserved[:, 0] *= 50.0  # one dominant dimension, as in GPT-2
    moment = preserved.T @ preserved / 400
    projector, dim = nullspace_projector(moment, 1e-2, rule="energy")
    inside = (preserved @ projector).pow(2).sum() / preserved.pow(2).sum()  # E‖Pk‖² / E‖k‖²
    assert 0 < dim < d
    assert inside <= 1e-2 + 1e-12
    eigenvalues = torch.linalg.eigvalsh(moment)  # ascending
    assert eigenvalues[: dim + 1].sum() > 1e-2 * eigenvalues.sum()  # as many as the bound allows
    with pytest.raises(ValueError, match="nullspace_rule"):
        nullspace_projector(moment, 1e-2, rule="bottom")


@pytest.mark.parametrize("kind", ["conv1d", "linear"])
def test_alphaedit_update_leaves_the_preserved_keys_outputs_unchanged(kind) -> None:
    g = seeded(5)
    d_in, d_out, rank = 12, 6, 6
    layer = random_layer(kind, d_in, d_out, g)
    layout = matrix_layout("layer.weight", layer)
    preserved = _low_rank_keys(g, d_in, rank, 100)
    projector, _ = nullspace_projector(preserved.T @ preserved / 100, 1e-6)
    keys, residual = torch.randn(3, d_in, generator=g), torch.randn(3, d_out, generator=g)
    earlier = torch.randn(2, d_in, generator=g, dtype=torch.float64)
    alpha = 0.5
    update = alphaedit_update(residual, keys, projector, alpha, earlier.T @ earlier)
    # the paper's eq. 14, with an explicit inverse: R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹
    k, kp, p = keys.double().T, earlier.T, projector
    paper = residual.double().T @ k.T @ p @ torch.linalg.inv(
        kp @ kp.T @ p + k @ k.T @ p + alpha * torch.eye(d_in, dtype=torch.float64))
    torch.testing.assert_close(update, paper, atol=1e-9, rtol=1e-8)
    with torch.no_grad():
        before_preserved, before_keys = layer(preserved), layer(keys)
        apply_matrix_update(layer.weight, layout, update)
        torch.testing.assert_close(layer(preserved), before_preserved, atol=1e-4, rtol=0)
        moved = layer(keys) - before_keys  # [3, d_out]
    assert moved.norm() > 0.1 * residual.norm()  # it does write something


def test_edit_keys_sum_their_batches_and_undo_exactly() -> None:
    g = seeded(6)
    store = EditKeys()
    assert store.gram(0) is None
    a, b = torch.randn(3, 5, generator=g), torch.randn(2, 5, generator=g)
    store.push([a])
    store.push([b])
    both = torch.cat([a, b]).double()
    torch.testing.assert_close(store.gram(0), both.T @ both)
    store.pop()
    torch.testing.assert_close(store.gram(0), a.double().T @ a.double())


# --------------------------------------------------------------------------- tiny model editors
@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return load_world(resolve_tinyfacts("tinyfacts"))


@pytest.fixture(scope="module")
def records(world):
    return world.edit_records(4, seed=5)


def _editor(cls_name: str, tmp_path: Path, world, records, **kwargs):
    """A small MEMIT/AlphaEdit on the 2-block TinyFacts model, C over a 400-text corpus.

    Block 0 by default: on two blocks, block 1's output at the subject reaches no later token.
    """
    import lit_edit.methods as methods

    subjects = [r.subject for r in records]
    texts = world.pretraining_texts()
    corpus = texts[:400] + [t for t in texts[400:] if any(s in t for s in subjects)]
    path = tmp_path.parent / f"{tmp_path.name}-corpus.txt"
    path.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    settings = {"layers": [0], "steps": 10, "prefix_lengths": [(3, 1)],
                "stats_dir": str(tmp_path), "mom2_corpus": str(path)}
    return getattr(methods, cls_name)(backbone="tinyfacts", **{**settings, **kwargs})


def _scores(editor, pairs) -> torch.Tensor:
    return torch.stack([s.logprobs.sum() for s in editor.score_pairs(pairs)])


@pytest.mark.parametrize("cls_name", ["MEMITEditor", "AlphaEditEditor"])
def test_a_batch_edit_changes_only_its_matrices_and_restores_bit_exactly(
    cls_name, tmp_path, world, records
) -> None:
    kwargs = {"mom2_update_weight": 10.0} if cls_name == "MEMITEditor" else {"l2": 1.0}
    editor = _editor(cls_name, tmp_path, world, records, **kwargs)
    names = ["model.transformer.h.0.mlp.c_proj.weight"]
    assert editor.edit_state_keys() == set(names)
    BatchEdit(batch_size=4).check(editor)  # any number of edits per call
    pairs = [r.edit_pair for r in records]
    before, scores = ParameterSnapshot(editor), _scores(editor, pairs)
    handle = apply_edit(editor, records)
    assert sorted(before.differences(editor)) == names
    edited = _scores(editor, pairs)
    handle.restore()
    assert edited.mean() > scores.mean()  # the edits moved the targets up
    assert before.differences(editor) == []
    assert torch.equal(_scores(editor, pairs), scores)


@pytest.mark.parametrize("layers", [[1], [0, 1]])
def test_only_the_configured_layers_change(tmp_path, world, records, layers) -> None:
    editor = _editor("MEMITEditor", tmp_path, world, records, layers=layers, steps=2,
                     mom2_update_weight=10.0)
    names = [f"model.transformer.h.{i}.mlp.c_proj.weight" for i in layers]
    before = ParameterSnapshot(editor)
    with apply_edit(editor, records[:2]):
        assert sorted(before.differences(editor)) == names
    assert before.differences(editor) == []


def test_alphaedit_sequential_batches_keep_earlier_keys_and_roll_back_exactly(
    tmp_path, world, records
) -> None:
    editor = _editor("AlphaEditEditor", tmp_path, world, records, l2=1.0,
                     mom2_exclude_subject=False)
    before = ParameterSnapshot(editor)
    with open_sequence(editor) as sequence:
        sequence.push(apply_edit(editor, records[:2]))
        assert len(editor.edit_keys) == 1
        gram = editor.edit_keys.gram(0)
        sequence.push(apply_edit(editor, records[2:]))
        assert len(editor.edit_keys) == 2
        assert not torch.equal(editor.edit_keys.gram(0), gram)
    assert len(editor.edit_keys) == 0
    assert before.differences(editor) == []
    values = editor.record_values(records[:1])[0]
    dim = values["nullspace_dim/transformer.h.0.mlp.c_proj"]
    assert 0 < dim < 512
    # a batch outside any sequence starts from no earlier keys and takes its own back
    with apply_edit(editor, records[:2]):
        assert len(editor.edit_keys) == 1
    assert len(editor.edit_keys) == 0
    assert before.differences(editor) == []


def test_sequential_batches_are_refused_for_one_edit_editors() -> None:
    class OneAtATime:
        max_edits_per_call = 1

    SequentialEdit(group_size=4, evaluate="after_group").check(OneAtATime())
    with pytest.raises(ValueError, match="batch_size: 1"):
        SequentialEdit(group_size=4, evaluate="after_group", batch_size=2).check(OneAtATime())


def test_unsorted_layers_are_refused(tmp_path, world, records) -> None:
    with pytest.raises(ValueError, match="MEMITEditor: layers must be distinct and ascending"):
        _editor("MEMITEditor", tmp_path, world, records, layers=[1, 0])
