"""Replaying the frozen part below an edited matrix: the same values, fewer forwards."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lit_edit.nn.edit_optim import optimise
from lit_edit.nn.frozen_prefix import frozen_modules, replay_frozen

NAME = "transformer.h.2.mlp.c_proj.weight"


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=4, n_head=2,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config).eval().requires_grad_(False)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[3, 5, 7, 9, 11], [4, 6, 8, 10, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    return {"input_ids": ids, "attention_mask": mask}


def _fine_tune(model: GPT2LMHeadModel, name: str, steps: int = 5) -> tuple[torch.Tensor, list]:
    """SGD on a copy of ``name`` (swapped in as the parameter) to raise token 1's logits."""
    param = model.get_parameter(name)
    original = param.detach().clone()
    batch = _batch()

    def loss() -> torch.Tensor:
        """Minus the mean logit of token 1 at the real positions."""
        logits = model(**batch, use_cache=False).logits
        return -(logits[..., 1] * batch["attention_mask"]).sum() / batch["attention_mask"].sum()

    try:
        losses = optimise([param], loss, steps, lr=0.5, optimizer="sgd")
        return param.detach().clone(), losses
    finally:
        with torch.no_grad():
            param.copy_(original)


def test_the_optimisation_takes_the_same_values_bit_for_bit() -> None:
    model = _model()
    plain, plain_losses = _fine_tune(model, NAME)
    with replay_frozen(model, NAME) as replays:
        replayed, replayed_losses = _fine_tune(model, NAME)
    assert torch.equal(plain, replayed) and plain_losses == replayed_losses
    assert not torch.equal(plain, model.get_parameter(NAME))  # it did train
    # blocks 0 and 1, block 2's attention and c_fc: run once, replayed at the 4 later steps
    assert [(r.calls, r.replays) for r in replays] == [(5, 4)] * 4
    assert all("forward" not in m.__dict__ for m in model.modules())  # forwards restored


def test_which_modules_are_frozen() -> None:
    model = _model()
    blocks = model.transformer.h
    assert frozen_modules(model, NAME) == [blocks[0], blocks[1], blocks[2].attn,
                                           blocks[2].mlp.c_fc]
    # the MLP input itself is trained: only the blocks before it are frozen
    assert frozen_modules(model, "transformer.h.2.mlp.c_fc.weight") == [blocks[0], blocks[1]]
    assert frozen_modules(model, "transformer.h.0.mlp.c_proj.weight") == [blocks[0].attn,
                                                                           blocks[0].mlp.c_fc]
    assert frozen_modules(model, "lm_head.weight") == []
    assert frozen_modules(model, "transformer.h.9.mlp.c_proj.weight") == []


def test_changed_inputs_training_mode_and_trained_inputs_run_for_real() -> None:
    model = _model()
    batch = _batch()
    one = {k: v[:1] for k, v in batch.items()}
    with torch.no_grad(), replay_frozen(model, NAME) as replays:
        first = model(**batch, use_cache=False).logits
        other = model(**one, use_cache=False).logits
        again = model(**one, use_cache=False).logits
        model(**one)  # a key/value cache object among the inputs: run for real
    # only the repeated call replays; with the cache, c_fc (its only input a tensor) too
    assert [r.replays for r in replays] == [1, 1, 1, 2]
    assert torch.equal(other, again)
    assert torch.equal(first, model(**batch, use_cache=False).logits)
    model.train()  # dropout: nothing may be replayed
    with torch.no_grad(), replay_frozen(model, NAME) as replays:
        model(**batch, use_cache=False)
        model(**batch, use_cache=False)
    assert [r.replays for r in replays] == [0] * 4
    model.eval()
    block = model.get_parameter("transformer.h.0.mlp.c_proj.weight")
    block.requires_grad_(True)  # something below is trained: block 0's output needs grad
    with replay_frozen(model, NAME) as replays:
        model(**batch, use_cache=False)
        model(**batch, use_cache=False)
    block.requires_grad_(False)
    assert replays[0].replays == 0 and replays[1].replays == 0


def test_ft_edits_are_bit_identical_with_and_without_the_replay(monkeypatch) -> None:
    import contextlib

    import lit_edit.methods.ft as ft_module
    from lit_edit.editor import apply_edit
    from lit_edit.methods import FTEditor
    from lit_edit.world import load_world, resolve_tinyfacts

    torch.set_num_threads(1)
    records = load_world(resolve_tinyfacts("tinyfacts")).edit_records(2, seed=3)
    editor = FTEditor(inner_params=["transformer.h.1.mlp.c_proj.weight"], steps=5).eval()
    weight = editor.inner[0]
    before = weight.detach().clone()
    seen: list = []
    replay = ft_module.replay_frozen

    @contextlib.contextmanager
    def counted(*args):
        """``replay_frozen``, its replays kept."""
        with replay(*args) as replays:
            yield replays
        seen.append([r.replays for r in replays])

    monkeypatch.setattr(ft_module, "replay_frozen", counted)
    with torch.inference_mode():
        handle = apply_edit(editor, records)
    replayed = weight.detach().clone()
    handle.restore()
    assert seen == [[4, 4, 4]]  # block 0, block 1's attention and c_fc
    monkeypatch.setattr(ft_module, "replay_frozen", lambda *a: contextlib.nullcontext())
    with torch.inference_mode():
        handle = apply_edit(editor, records)
    assert torch.equal(weight, replayed) and not torch.equal(weight, before)
    handle.restore()
    assert torch.equal(weight, before)
