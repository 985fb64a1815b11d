"""ROME and the shared locate-then-edit machinery (lit_edit/nn/locate.py, lit_edit/methods/rome.py).

Key positions under both paddings and with BOS; the closed-form update writes k* → v* exactly
(nn.Linear and Conv1D, square included); batched value optimisation equals one fact at a time;
the second moment without some texts equals recomputing it; ROME's edit changes only its matrix,
restores bit-exactly and is refused by the batch protocol.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lit_edit.backbone import Backbone
from lit_edit.editing import ParameterSnapshot
from lit_edit.editor import apply_edit
from lit_edit.nn.fact_tokens import (
    FactRequest,
    context_prefixes,
    requests_of,
    subject_last_positions,
)
from lit_edit.nn.layer_stats import input_second_moment, moment_without
from lit_edit.nn.layout import matrix_layout, mlp_out_name
from lit_edit.nn.locate import (
    apply_matrix_update,
    compute_keys,
    compute_values,
    rank_one_update,
)
from lit_edit.protocols import BatchEdit
from lit_edit.world import load_world, resolve_tinyfacts


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    backbone = Backbone.of("tinyfacts")
    return backbone.load_model(), backbone.load_tokenizer()


@pytest.fixture(scope="module")
def records():
    return load_world(resolve_tinyfacts("tinyfacts")).edit_records(3, seed=5)


PROMPTS = ["Who employs Mounaeth Reimok?", "Ana Lo was born in the city of", "Where is Ana Lo?"]
SUBJECTS = ["Mounaeth Reimok", "Ana Lo", "Ana Lo"]


def test_block_indices_count_from_the_end_and_out_of_range_fails(tiny) -> None:
    model, _ = tiny  # 2 blocks
    assert mlp_out_name(model, -1) == mlp_out_name(model, 1) == "transformer.h.1.mlp.c_proj"
    assert mlp_out_name(model, -2) == "transformer.h.0.mlp.c_proj"
    for layer in (2, 17, -3):  # once wrapped silently (17 -> block 1)
        with pytest.raises(ValueError, match=f"block index {layer} is out of range .* 2 blocks"):
            mlp_out_name(model, layer)


@pytest.mark.parametrize("side", ["left", "right"])
def test_key_position_is_the_subjects_last_token_under_padding_and_bos(tiny, side) -> None:
    _, tokenizer = tiny
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer adds BOS
    ids, mask, pos = subject_last_positions(tokenizer, PROMPTS, SUBJECTS, padding_side=side)
    for row, (prompt, subject) in enumerate(zip(PROMPTS, SUBJECTS, strict=True)):
        end = prompt.index(subject) + len(subject)
        upto = tokenizer(prompt[:end])["input_ids"]  # BOS + tokens up to the subject's end
        real = ids[row][mask[row].bool()].tolist()
        n_pad = ids.shape[1] - len(real)
        assert real[0] == tokenizer.bos_token_id
        assert real[: len(upto)] == upto
        expected = len(upto) - 1 + (n_pad if side == "left" else 0)
        assert int(pos[row]) == expected
        assert int(ids[row, pos[row]]) == upto[-1]
        assert tokenizer.decode([upto[-1]]).strip() and subject.endswith(
            tokenizer.decode([upto[-1]]).strip())


def test_key_positions_agree_across_paddings(tiny) -> None:
    _, tokenizer = tiny
    left = subject_last_positions(tokenizer, PROMPTS, SUBJECTS, padding_side="left")
    right = subject_last_positions(tokenizer, PROMPTS, SUBJECTS, padding_side="right")
    rows = torch.arange(len(PROMPTS))
    assert torch.equal(left[0][rows, left[2]], right[0][rows, right[2]])


def test_a_subject_missing_from_its_prompt_fails_clearly() -> None:
    with pytest.raises(ValueError, match="does not occur"):
        FactRequest("Who employs Ana?", "Bob", "Acme")


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv1d_square"])
def test_rank_one_update_writes_the_key_exactly(kind) -> None:
    torch.manual_seed(0)
    d_in, d_out = (6, 6) if kind == "conv1d_square" else (6, 4)
    layer = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
    with torch.no_grad():
        layer.bias.normal_()
        layer.weight.normal_()
    layout = matrix_layout("layer.weight", layer)
    assert layout.transposed == (kind == "linear")
    samples = torch.randn(50, d_in)  # K₀
    moment = samples.T @ samples / 50  # C, [d_in, d_in]
    key = torch.randn(d_in)
    value = torch.randn(d_out)  # v*
    current = layer(key[None])[0].detach()
    update = rank_one_update(key, value - current, moment)  # [d_out, d_in]
    assert update.shape == (d_out, d_in)
    other = torch.linalg.solve(moment, torch.randn(d_in))
    other = other - (other @ torch.linalg.solve(moment, key)) / (
        key @ torch.linalg.solve(moment, key)) * key  # uᵀ other = 0: C⁻¹k* ⟂ other
    before_other = layer(other[None])[0].detach()
    apply_matrix_update(layer.weight, layout, update)
    torch.testing.assert_close(layer(key[None])[0].detach(), value, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(other[None])[0].detach(), before_other, atol=1e-5,
                               rtol=1e-5)


def test_rank_one_update_from_a_factorised_c_equals_the_direct_solve() -> None:
    """One LU of C for many edits gives the very values of solving C per edit."""
    torch.manual_seed(2)
    samples = torch.randn(40, 8)
    moment = samples.T @ samples / 40  # C, [8, 8]
    factor = torch.linalg.lu_factor(moment.double())
    for _ in range(3):
        key, direction, delta = torch.randn(8), torch.randn(8), torch.randn(5)
        assert torch.equal(rank_one_update(key, delta, moment, factor=factor),
                           rank_one_update(key, delta, moment))
        assert torch.equal(rank_one_update(key, delta, moment, direction, factor=factor),
                           rank_one_update(key, delta, moment, direction))


def test_rank_one_update_without_c_and_with_a_direction_key() -> None:
    torch.manual_seed(1)
    key, direction, delta = torch.randn(5), torch.randn(5), torch.randn(3)
    update = rank_one_update(key, delta, None, direction_key=direction)
    torch.testing.assert_close(update @ key, delta, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(update) == 1


def test_batched_values_equal_one_fact_at_a_time(tiny, records) -> None:
    model, tokenizer = tiny
    module = model.transformer.h[0].mlp.c_proj
    templates = context_prefixes(model, tokenizer, [(3, 2)], seed=0)
    requests = requests_of(records)
    settings = {"steps": 6, "lr": 0.5, "stop_below": 1e-9}
    batched = compute_values(model, tokenizer, module, requests, templates, **settings)
    assert batched.delta.shape == (3, model.config.n_embd)
    for f, request in enumerate(requests):
        alone = compute_values(model, tokenizer, module, [request], templates, **settings)
        torch.testing.assert_close(batched.h0[f], alone.h0[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched.delta[f], alone.delta[0], atol=1e-3, rtol=1e-3)
    assert not any(p.grad is not None for p in model.parameters())


def test_batched_values_clamp_and_stop_per_fact(tiny, records) -> None:
    model, tokenizer = tiny
    module = model.transformer.h[0].mlp.c_proj
    result = compute_values(model, tokenizer, module, requests_of(records), ["{}"], steps=8,
                            lr=5.0, clamp_norm_factor=0.5)
    ratio = result.delta.norm(dim=-1) / result.h0.norm(dim=-1)
    assert bool((ratio <= 0.5 + 1e-4).all())
    stopped = compute_values(model, tokenizer, module, requests_of(records), ["{}"], steps=8,
                             stop_below=1e9)  # every fact stops before the first step
    assert len(stopped.losses) == 1 and bool((stopped.delta == 0).all())


def test_keys_average_the_templates(tiny, records) -> None:
    model, tokenizer = tiny
    module = model.transformer.h[0].mlp.c_proj
    requests = requests_of(records[:1])
    templates = context_prefixes(model, tokenizer, [(3, 2)], seed=0)
    assert templates[0] == "{}" and len(templates) == 3
    assert templates == context_prefixes(model, tokenizer, [(3, 2)], seed=0)  # seeded
    mean = compute_keys(model, tokenizer, module, requests, templates)
    parts = [compute_keys(model, tokenizer, module, requests, [t]) for t in templates]
    torch.testing.assert_close(mean, torch.stack(parts).mean(0), atol=1e-5, rtol=1e-5)


def test_moment_without_texts_equals_recomputing(tiny) -> None:
    model, tokenizer = tiny
    texts = load_world(resolve_tinyfacts("tinyfacts")).pretraining_texts()[:60]
    layer = "transformer.h.0.mlp.c_proj"
    full, n = input_second_moment(model, tokenizer, layer, texts, max_tokens=10**9)
    kept, _ = input_second_moment(model, tokenizer, layer, texts[10:], max_tokens=10**9)
    without = moment_without(full, n, model, tokenizer, layer, texts[:10])
    torch.testing.assert_close(without, kept, atol=1e-4, rtol=1e-4)


def rome(tmp_path: Path, **kwargs):
    """A small ROME on the 2-block TinyFacts model, C over a 400-text corpus (fast)."""
    from lit_edit.methods.rome import ROMEEditor

    world = load_world(resolve_tinyfacts("tinyfacts"))
    subjects = [r.subject for r in world.edit_records(3, seed=5)]
    texts = world.pretraining_texts()
    corpus = texts[:400] + [t for t in texts[400:] if any(s in t for s in subjects)]
    path = tmp_path.parent / f"{tmp_path.name}-corpus.txt"
    path.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    settings = {"layer": 0, "steps": 5, "prefix_lengths": [(3, 2)], "stats_dir": str(tmp_path),
                "mom2_corpus": str(path)}
    return ROMEEditor(backbone="tinyfacts", **{**settings, **kwargs})


def test_rome_changes_only_its_matrix_and_restores_bit_exactly(tmp_path, records) -> None:
    editor = rome(tmp_path)
    assert editor.edit_state_keys() == {"model.transformer.h.0.mlp.c_proj.weight"}
    before = ParameterSnapshot(editor)
    pair = records[0].edit_pair
    score = editor.score_pairs([pair])[0]
    with torch.inference_mode():
        handle = apply_edit(editor, records[:1])
        assert before.differences(editor) == ["model.transformer.h.0.mlp.c_proj.weight"]
        edited = editor.score_pairs([pair])[0]
        handle.restore()
    assert edited.logprobs.sum() > score.logprobs.sum()  # the edit moved the target up
    assert before.differences(editor) == []
    assert torch.equal(editor.score_pairs([pair])[0].logprobs, score.logprobs)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # C cached once


def test_rome_is_refused_by_the_batch_protocol(tmp_path, records) -> None:
    editor = rome(tmp_path)
    assert editor.max_edits_per_call == 1
    with pytest.raises(ValueError, match="at most 1 edit"):
        BatchEdit(batch_size=2).check(editor)
    with pytest.raises(ValueError, match="at most 1 edit"):
        apply_edit(editor, records[:2])


def test_rome_statistics_are_rebuilt_when_the_weights_change(tmp_path, records) -> None:
    moment, _ = rome(tmp_path).second_moment()
    again = rome(tmp_path)  # same weights: the cached file is read, not recomputed
    torch.testing.assert_close(again.second_moment()[0], moment)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    changed = rome(tmp_path)
    with torch.no_grad():
        changed.model.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    assert not torch.allclose(changed.second_moment()[0], moment)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_rome_excludes_the_edited_subject_from_c(tmp_path, records) -> None:
    editor = rome(tmp_path)
    subject = records[0].subject
    full, _ = editor.second_moment()
    without = editor.moment_for(subject)
    assert not torch.equal(full, without)
    assert torch.equal(rome(tmp_path, mom2_exclude_subject=False).moment_for(subject), full)
    with pytest.raises(ValueError, match="mom2_max_tokens"):
        rome(tmp_path / "cut", mom2_max_tokens=500).moment_for(subject)


def test_the_four_block_tinyfacts_model_is_named_and_retargeted_per_world() -> None:
    import importlib.util

    from lit_edit.world import named_configs

    world, model = named_configs("tinyfacts-4l-seed2")
    assert (world.seed, model.seed, model.n_layer, model.arch) == (2, 2, 4, "gpt2")
    assert named_configs("tinyfacts-4l")[0] == named_configs("tinyfacts")[0]  # same world
    spec = importlib.util.spec_from_file_location(
        "seeds", Path(__file__).resolve().parents[1] / "bench" / "seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    assert seeds.retarget({"backbone": "tinyfacts-4l"}, "tinyfacts-seed1") == {
        "backbone": "tinyfacts-4l-seed1"}
    assert seeds.retarget("tinyfacts-4l", "tinyfacts") == "tinyfacts-4l"


@pytest.mark.parametrize("site", ["transformer.h.1.mlp.c_proj", "transformer.h.1"])
def test_values_are_bit_identical_with_and_without_the_replay(tiny, records, site,
                                                              monkeypatch) -> None:
    import contextlib

    import lit_edit.nn.locate as locate

    model, tokenizer = tiny
    module = model.get_submodule(site)  # ROME's site (a matrix) and MEMIT's (a block)
    requests = requests_of(records)
    settings = {"steps": 4, "lr": 0.5, "stop_below": 1e-9}
    seen: list = []
    replay = locate.replay_frozen

    @contextlib.contextmanager
    def counted(*args):
        """``replay_frozen``, its replays kept."""
        with replay(*args) as replays:
            yield replays
        seen.append([r.replays for r in replays])

    monkeypatch.setattr(locate, "replay_frozen", counted)
    replayed = compute_values(model, tokenizer, module, requests, ["{}"], **settings)
    # the first no-grad pass, then 4 steps: block 0 (and for the matrix, its block's
    # attention and c_fc) replayed 4 times
    assert seen == [[4, 4, 4] if site.endswith("c_proj") else [4]]
    monkeypatch.setattr(locate, "replay_frozen", lambda *a: contextlib.nullcontext())
    plain = compute_values(model, tokenizer, module, requests, ["{}"], **settings)
    assert torch.equal(replayed.delta, plain.delta) and replayed.losses == plain.losses
    assert bool((plain.delta != 0).any())


def test_rome_with_one_c_factorises_it_once_and_edits_as_the_direct_solve(tmp_path,
                                                                          records) -> None:
    """Without subject exclusion every edit reuses one LU of C; the weights come out the same."""
    editor = rome(tmp_path, mom2_exclude_subject=False)
    weight = editor.model.transformer.h[0].mlp.c_proj.weight
    factored = []
    with torch.inference_mode():
        for record in records[:2]:
            handle = apply_edit(editor, [record])
            factored.append(weight.detach().clone())
            handle.restore()
    first = editor._factor
    assert first is not None and first[0] is editor.second_moment()[0]
    editor.moment_factor()
    assert editor._factor is first  # factorised once, not per edit
    editor._factor = None
    editor.moment_factor = lambda: None  # every edit solves C directly
    with torch.inference_mode():
        for record, expected in zip(records[:2], factored, strict=True):
            handle = apply_edit(editor, [record])
            assert torch.equal(weight.detach(), expected)
            handle.restore()
