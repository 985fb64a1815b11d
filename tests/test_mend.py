"""MEND parts and editor on random-init tiny GPT-2 / LLaMA backbones (no world needed)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lit_edit.editing import HandleStack, ParameterSnapshot
from lit_edit.methods import FTEditor, MENDEditor
from lit_edit.nn.hooks import capture_factors
from lit_edit.nn.losses import answer_logits, locality_kl, masked_nll
from lit_edit.nn.mend import GradientTransform, LowRankResidual, MENDNetwork, RunningNorm
from lit_edit.records import EditRecord, QAPair

WORDS = (
    "Ana Bo Cy Di Ed Flo Gus Hal Ivo Jo born lives works in at for speaks the city of Paris Rome "
    "Oslo Lima Kyiv Baku Acme Initech French Latin Norse where was is what who which language"
).split()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE where most words of WORDS are single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_backbone(path: Path, arch: str) -> Path:
    """Save a random-init 2-block model and its tokenizer to ``path``."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    common = {"vocab_size": len(tok), "bos_token_id": 0, "eos_token_id": 0}
    if arch == "gpt2":
        cfg = GPT2Config(
            n_layer=2, n_embd=32, n_head=2, n_positions=64, initializer_range=0.3, **common
        )
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            initializer_range=0.3,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mend_backbones")
    return {a: str(make_backbone(root / a, a)) for a in ("gpt2", "llama")}


def record(i: int = 0) -> EditRecord:
    name = WORDS[i % 10]
    return EditRecord(
        prompt=f"{name} was born in the city of",
        target_new=["Paris", "Rome", "Oslo"][i % 3],
        subject=name,
        rephrase_prompts=(f"where was {name} born",),
        locality={"neighborhood": (QAPair(f"{WORDS[(i + 3) % 10]} speaks", "Latin"),)},
    )


def editor(backbones: dict[str, str], arch: str = "gpt2", **kwargs: object) -> MENDEditor:
    torch.manual_seed(0)
    kwargs.setdefault("rank", 8)
    return MENDEditor(backbone=backbones[arch], **kwargs)


# --- parts ----------------------------------------------------------------------------------


def test_low_rank_residual_is_identity_at_init() -> None:
    layer = LowRankResidual(12, rank=4, n_modes=3)
    z = torch.randn(5, 12)
    for mode in range(3):
        assert torch.equal(layer(z, mode), z)


def test_gradient_transform_is_identity_at_init() -> None:
    transform = GradientTransform(6, 10, n_modes=2, rank=4).eval()
    u, delta = torch.randn(7, 6), torch.randn(7, 10)
    u2, d2 = transform(u, delta, mode=1)
    assert torch.equal(u2, u) and torch.equal(d2, delta)  # no statistics yet: exact identity
    transform.train()
    u2, d2 = transform(u, delta, mode=0)  # statistics collected: identity on normalised factors
    torch.testing.assert_close(u2, (u - u.mean(0)) / (u.std(0) + 1e-7))
    torch.testing.assert_close(d2, (delta - delta.mean(0)) / (delta.std(0) + 1e-7))


def test_running_norm_matches_full_statistics_and_updates_only_in_training() -> None:
    norm = RunningNorm(3)
    chunks = [torch.randn(n, 3) * 2 + 1 for n in (1, 4, 7)]
    for chunk in chunks:
        norm.update(chunk)
    data = torch.cat(chunks)
    assert norm.count.item() == 12
    torch.testing.assert_close(norm.mean, data.mean(0))
    torch.testing.assert_close(norm.std, data.std(0))

    transform = GradientTransform(3, 2, rank=2).eval()
    transform(torch.randn(4, 3), torch.randn(4, 2))
    assert transform.norm_u.count.item() == 0  # eval: frozen
    transform.train()(torch.randn(4, 3), torch.randn(4, 2))
    assert transform.norm_u.count.item() == 4 and transform.norm_delta.count.item() == 4


def test_network_shares_one_transform_per_shape(backbones: dict[str, str]) -> None:
    ed = editor(backbones, "llama")
    net = ed.network
    assert sorted(net.transforms) == ["32x48", "48x32"]  # gate+up share one, down another
    assert net.transforms["32x48"].layers[0].mode_scale.shape == (4, 80)  # 2 blocks x 2 kinds
    assert net.edit_lrs.shape == (6,)
    unshared = MENDNetwork(net.matrices, rank=4, shared=False)
    assert len(unshared.transforms) == 6


# --- the edit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("descent", [True, False])
def test_untrained_editor_edit_is_a_scaled_gradient_step(
    backbones: dict[str, str], arch: str, descent: bool
) -> None:
    ed = editor(backbones, arch, edit_lr=1e-2, descent=descent)
    rec = record()
    batch = ed.collator.pairs([rec.edit_pair])
    for p in ed.inner:
        p.requires_grad_(True)
    logits = ed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    grads = torch.autograd.grad(masked_nll(logits, batch["labels"]), ed.inner)
    for p in ed.inner:
        p.requires_grad_(False)
    before = [p.detach().clone() for p in ed.inner]
    ed.edit([rec])
    sign = -1.0 if descent else 1.0
    for p, b, g in zip(ed.inner, before, grads, strict=True):
        assert (p - b).abs().max() > 1e-4
        # compare with float32 rounding of W + update in mind (|W| ~ 1)
        torch.testing.assert_close(p - b, sign * 1e-2 * g, rtol=1e-4, atol=3e-7)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_answer_logits_are_the_full_logits_at_the_answer_positions(
    backbones: dict[str, str], arch: str
) -> None:
    ed = editor(backbones, arch)
    batch = ed.collator.pairs([record(0).edit_pair, record(1).edit_pair, record(2).edit_pair])
    with torch.no_grad():
        full = ed.model(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits  # [B, L, V]
        logits, target = answer_logits(ed.model, batch["input_ids"], batch["attention_mask"],
                                       batch["labels"])
    rows, cols = torch.nonzero(batch["labels"][:, 1:] != -100, as_tuple=True)
    assert len(rows) == len(target) >= 3  # every row has its answer
    torch.testing.assert_close(logits, full[rows, cols], rtol=1e-5, atol=1e-5)
    assert torch.equal(target, batch["input_ids"][rows, cols + 1])  # the next tokens
    nll = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(nll, masked_nll(full, batch["labels"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_captured_factors_give_the_true_gradient(backbones: dict[str, str], arch: str) -> None:
    ed = editor(backbones, arch)
    batch = ed.collator.pairs([record(0).edit_pair, record(1).edit_pair])  # padded batch
    factors, _ = capture_factors(
        ed.model,
        ed.inner_names,
        ed._layers,
        lambda logits: masked_nll(logits, batch["labels"]),
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
    )
    for p in ed.inner:
        p.requires_grad_(True)
    logits = ed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    grads = torch.autograd.grad(masked_nll(logits, batch["labels"]), ed.inner)
    for p in ed.inner:
        p.requires_grad_(False)
    n_tokens = int(batch["attention_mask"].sum())
    for (u, delta), m, g in zip(factors, ed.network.matrices, grads, strict=True):
        assert u.shape[0] < n_tokens  # padding and the last position were dropped
        outer = delta.T @ u if m.transposed else u.T @ delta
        torch.testing.assert_close(outer, g, rtol=1e-4, atol=1e-7)
    assert not any(m._forward_hooks for m in ed._layers)  # hooks removed


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_only_inner_parameters_change_and_restore_is_bit_exact(
    backbones: dict[str, str], arch: str
) -> None:
    ed = editor(backbones, arch, edit_lr=1e-2)
    for t in ed.network.transforms.values():  # statistics: not the identity any more
        t.train()(torch.randn(5, t.d_in), torch.randn(5, t.d_out))
    snapshot = ParameterSnapshot(ed)
    handle = ed.edit([record(0), record(1)])
    changed = snapshot.differences(ed)
    assert changed == sorted(f"model.{n}" for n in ed.inner_names)
    handle.restore()
    assert snapshot.differences(ed) == []
    with HandleStack() as stack:  # sequential edits, rolled back together
        for i in range(4):
            stack.push(ed.edit([record(i)]))
    assert snapshot.differences(ed) == []


def test_edit_under_inference_mode_leaves_network_mode_and_statistics(
    backbones: dict[str, str],
) -> None:
    from lit_edit.editor import apply_edit

    ed = editor(backbones).train()
    counts = [t.norm_u.count.item() for t in ed.network.transforms.values()]
    with torch.inference_mode():  # as Lightning's test loop calls the protocols
        handle = apply_edit(ed, [record()])
        handle.restore()
    assert ed.network.training
    assert [t.norm_u.count.item() for t in ed.network.transforms.values()] == counts


def test_missing_inner_parameter_lists_close_matches(backbones: dict[str, str]) -> None:
    with pytest.raises(KeyError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
        editor(backbones, inner_params=["transformer.h.1.mlp.c_fcc.weight"])
    with pytest.raises(ValueError, match="not weights"):
        editor(backbones, inner_params=["transformer.h.1.mlp.c_fc.bias"])
    with pytest.raises(TypeError, match="nn.Linear and GPT-2 Conv1D"):
        editor(backbones, inner_params=["transformer.h.1.ln_2.weight"])


# --- training -------------------------------------------------------------------------------


def test_training_step_trains_only_the_network_and_never_touches_the_backbone(
    backbones: dict[str, str],
) -> None:
    ed = editor(backbones).train()
    backbone = ParameterSnapshot(ed.model)
    loss = ed.training_step(ed.collator([record(0), record(1)]), 0)
    loss.backward()
    assert backbone.differences(ed.model) == []
    assert all(p.grad is None for p in ed.model.parameters())
    assert ed.network.edit_lrs.grad is not None
    assert ed.network.transforms["32x128"].layers[0].u.grad.abs().sum() > 0
    assert not ed.model.training  # the backbone never runs dropout
    assert ed.network.transforms["32x128"].norm_u.count.item() > 0


def test_locality_kl_is_zero_for_equal_logits_and_aligned_to_the_next_token() -> None:
    base = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[:, 3:] = 1
    assert locality_kl(base, base.clone(), labels).item() == pytest.approx(0.0, abs=1e-6)
    edited = base.clone()
    edited[:, 4] += torch.randn(2, 7)  # the last position predicts nothing: ignored
    assert locality_kl(base, edited, labels).item() == pytest.approx(0.0, abs=1e-6)
    edited[:, 2] += torch.randn(2, 7)  # position 2 predicts label 3
    assert locality_kl(base, edited, labels).item() > 0


def _edit_loss(ed: MENDEditor, records: list[EditRecord]) -> float:
    with torch.no_grad():
        ed.eval()
        losses = [ed.meta_step(ed.collator([r]))["loss_edit"] for r in records]
    return float(torch.stack(losses).mean())


def test_a_short_fit_lowers_the_edit_loss(backbones: dict[str, str]) -> None:
    from lightning import Trainer
    from torch.utils.data import DataLoader

    ed = editor(backbones, lr=1e-3, lr_lr=1e-2, edit_lr=1e-2, c_edit=1.0)
    records = [record(i) for i in range(6)]
    before = _edit_loss(ed, records)
    loader = DataLoader(records, batch_size=1, shuffle=True, collate_fn=list)
    trainer = Trainer(
        max_steps=40,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=100.0,
    )
    trainer.fit(ed, loader)
    after = _edit_loss(ed, records)
    assert after < 0.5 * before, (before, after)
    assert ed.skipped_steps.item() == 0


def test_non_finite_steps_are_skipped_and_counted(backbones: dict[str, str]) -> None:
    from lightning import Trainer
    from torch.utils.data import DataLoader

    ed = editor(backbones, lr=1e-3, c_edit=math.nan)
    start = ParameterSnapshot(ed.network)
    loader = DataLoader([record(i) for i in range(3)], batch_size=1, collate_fn=list)
    trainer = Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=100.0,
    )
    trainer.fit(ed, loader)
    assert ed.skipped_steps.item() == 3
    learned = [n for n in start.differences(ed.network) if "norm_" not in n]
    assert learned == []  # no parameter moved (only the running statistics did)


def test_checkpoint_holds_the_editor_not_the_backbone_and_reproduces_the_edit(
    backbones: dict[str, str], tmp_path: Path
) -> None:
    from lightning import Trainer
    from torch.utils.data import DataLoader

    ed = editor(backbones, lr=1e-3, edit_lr=1e-3)
    loader = DataLoader([record(i) for i in range(4)], batch_size=1, collate_fn=list)
    trainer = Trainer(
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(ed, loader)
    path = tmp_path / "mend.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert not any(k.startswith("model.") for k in state)
    assert "network.edit_lrs" in state and "network.transforms.32x128.norm_u.mean" in state
    assert state["network.transforms.32x128.norm_u.count"].item() > 0

    loaded = MENDEditor.load_from_checkpoint(path)
    assert loaded.hparams.rank == 8
    rec = record(5)
    expected = ParameterSnapshot(ed)
    with ed.edit([rec]):
        edited = {n: p.detach().clone() for n, p in zip(ed.inner_names, ed.inner, strict=True)}
    with loaded.edit([rec]):
        for n, p in zip(loaded.inner_names, loaded.inner, strict=True):
            assert torch.equal(p, edited[n])
    assert expected.differences(ed) == []
    with pytest.raises(TypeError, match="cannot be loaded into"):
        FTEditor.load_from_checkpoint(path, backbone=backbones["gpt2"])


def test_collate_all_rephrases_and_locality_pairs(backbones: dict[str, str]) -> None:
    rec = EditRecord(
        prompt="Ana was born in the city of",
        target_new="Rome",
        rephrase_prompts=("where was Ana born", "Ana was born in"),
        locality={
            "a": (QAPair("Bo speaks", "Latin"), QAPair("Cy speaks", "Norse")),
            "b": (QAPair("Di lives in", "Oslo"),),
        },
    )
    first = editor(backbones).collate([rec, record(1)])
    assert first["rephrase"]["input_ids"].shape[0] == 2
    assert first["locality"]["input_ids"].shape[0] == 2
    full = editor(backbones, train_rephrases="all", train_locality="all").collate([rec, record(1)])
    assert full["rephrase"]["input_ids"].shape[0] == 3
    assert full["locality"]["input_ids"].shape[0] == 4
    assert full["locality"]["record_index"].tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("target", ["rephrase", "inner", "both"])
def test_edit_loss_targets(backbones: dict[str, str], target: str) -> None:
    ed = editor(backbones, edit_loss_on=target).train()
    batch = ed.collate([record(0)])
    result = ed.meta_step(batch)
    assert result["loss_edit"].requires_grad and torch.isfinite(result["loss"])
    measured = ed.meta_step(batch, measure=True)
    assert {"reliability", "edit_success", "locality"} <= set(measured)


def test_bad_choices_are_rejected(backbones: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="edit_loss_on"):
        editor(backbones, edit_loss_on="outer")
    with pytest.raises(ValueError, match="train_locality"):
        editor(backbones, train_locality="some")
