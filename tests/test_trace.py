"""Causal tracing (lit_edit/nn/causal_trace.py, lit_edit/trace.py).

Noise 0 gives no effect; restoring every state reproduces the clean run; states before the
subject and the last block's states before the last token cannot matter (causal attention), so
restoring them gives the corrupted probability and the last block at the last token gives the
clean one; batching does not change the numbers; a tiny LLaMA and GPT-NeoX run; the CLI writes
the PNG and the numbers and fails in one line on a subject not in the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

from lit_edit.backbone import Backbone
from lit_edit.nn.causal_trace import (
    category_effects,
    clean_states,
    corrupted_embeddings,
    embedding_std,
    encode_prompt,
    restored_probabilities,
    site_modules,
    trace_prompt,
    window_layers,
)

PROMPT, SUBJECT = "Ana Lo was born in", "Ana Lo"


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    backbone = Backbone.of("tinyfacts")
    return backbone.load_model(), backbone.load_tokenizer()


def _random_model(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_encode_prompt_finds_the_subject_tokens_and_the_answer(tiny) -> None:
    model, tokenizer = tiny
    p = encode_prompt(tokenizer, PROMPT, SUBJECT, "Paris", model)
    s0, s1 = p.subject
    assert "".join(p.tokens[s0:s1]).strip() == SUBJECT.replace(" ", "") or (
        "".join(p.tokens[s0:s1]).replace(" ", "") == SUBJECT.replace(" ", ""))
    assert p.answer_id == tokenizer(PROMPT + " Paris")["input_ids"][len(p.tokens)]
    greedy = encode_prompt(tokenizer, PROMPT, SUBJECT, None, model)
    assert greedy.answer_id == int(model(input_ids=p.input_ids[None]).logits[0, -1].argmax())
    with pytest.raises(ValueError, match="does not occur"):
        encode_prompt(tokenizer, PROMPT, "Bob", "Paris")


def test_no_noise_no_effect(tiny) -> None:
    model, tokenizer = tiny
    p = encode_prompt(tokenizer, PROMPT, SUBJECT, None, model)
    for kind in ("block", "mlp", "attn"):
        r = trace_prompt(model, p, kind, noise_factor=0.0, samples=2)
        assert r.p_corrupted == pytest.approx(r.p_clean, abs=1e-5)
        assert r.indirect_effect.abs().max() < 1e-5


def test_restoring_every_state_gives_the_clean_run(tiny) -> None:
    model, tokenizer = tiny
    p = encode_prompt(tokenizer, PROMPT, SUBJECT, None, model)
    for kind in ("block",):  # MLP/attention outputs alone leave the noised embedding residual
        modules = site_modules(model, kind)
        clean, p_clean, embeds = clean_states(model, p, modules)
        noisy = corrupted_embeddings(embeds, p.subject, 3 * embedding_std(model), samples=3)
        everything = torch.ones(len(modules), 3, embeds.shape[1], dtype=torch.bool)
        probs = restored_probabilities(model, noisy, modules, clean, everything, p.answer_id)
        assert torch.allclose(probs, torch.full((3,), p_clean), atol=1e-6), kind
        nothing = torch.zeros_like(everything)
        corrupted = restored_probabilities(model, noisy, modules, clean, nothing, p.answer_id)
        assert (corrupted - p_clean).abs().max() > 1e-3  # the noise does something


def test_what_causal_attention_says_cannot_matter(tiny) -> None:
    """Prefix tokens are clean anyway; the last block only reaches the logits at the last token."""
    model, tokenizer = tiny
    p = encode_prompt(tokenizer, "Where was Ana Lo born?", SUBJECT, None, model)
    s0, _ = p.subject
    assert s0 >= 2  # BOS, "Where", "was" come before the subject
    r = trace_prompt(model, p, "block", samples=4)
    assert r.p_corrupted < r.p_clean - 0.05
    before = r.p_restored[:, :s0]
    assert torch.allclose(before, torch.full_like(before, r.p_corrupted), atol=1e-6)
    last_layer = r.p_restored[-1]
    assert torch.allclose(last_layer[:-1], torch.full_like(last_layer[:-1], r.p_corrupted),
                          atol=1e-6)
    assert last_layer[-1] == pytest.approx(r.p_clean, abs=1e-6)


def test_batch_size_does_not_change_the_trace(tiny) -> None:
    model, tokenizer = tiny
    p = encode_prompt(tokenizer, PROMPT, SUBJECT, None, model)
    big = trace_prompt(model, p, "mlp", window=1, samples=3, batch_size=512)
    small = trace_prompt(model, p, "mlp", window=1, samples=3, batch_size=7)
    assert torch.allclose(big.p_restored, small.p_restored, atol=1e-6)
    assert small.p_corrupted == pytest.approx(big.p_corrupted, abs=1e-6)
    assert category_effects(big).shape == (2, 6)


def test_window_is_romes_and_clipped() -> None:
    assert list(window_layers(5, 10, 48)) == list(range(0, 10))
    assert list(window_layers(20, 10, 48)) == list(range(15, 25))
    assert list(window_layers(47, 10, 48)) == list(range(42, 48))
    assert list(window_layers(2, 1, 4)) == [2]


@pytest.mark.parametrize("config", [
    LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    GPTNeoXConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=64),
], ids=["llama", "gpt_neox"])
def test_other_architectures_trace(tiny, config) -> None:
    _, tokenizer = tiny
    model = _random_model(config)
    p = encode_prompt(tokenizer, PROMPT, SUBJECT, None, model)
    for kind in ("block", "mlp", "attn"):
        r = trace_prompt(model, p, kind, samples=2)
        assert r.p_restored.shape == (3, len(p.tokens))
        assert r.p_restored[-1, -1] == pytest.approx(r.p_clean, abs=1e-6) or kind != "block"
        zero = trace_prompt(model, p, kind, noise_factor=0.0, samples=1)
        assert zero.indirect_effect.abs().max() < 1e-5


def test_cli_writes_the_png_and_the_numbers(tmp_path: Path, capsys) -> None:
    from lit_edit.trace import main

    out = tmp_path / "one"
    assert main(["--model", "tinyfacts", "--prompt", PROMPT, "--subject", SUBJECT,
                 "--kind", "block", "--kind", "mlp", "--window", "1", "--samples", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pick this layer:" in printed and printed.count("pick this layer") == 2
    for kind in ("block", "mlp"):
        assert (out / f"trace_{kind}.png").read_bytes()[:4] == b"\x89PNG"
        info = json.loads((out / f"trace_{kind}.json").read_text())
        assert len(info["trace"]["p_restored"]) == 2 and 0 <= info["pick_layer"] < 2
    tensors = torch.load(out / "trace.pt")
    assert tensors["block/p_restored"].shape[0] == 2


def test_cli_averages_records_of_a_world(tmp_path: Path, capsys) -> None:
    from lit_edit.trace import main

    out = tmp_path / "data"
    assert main(["--model", "tinyfacts", "--data", "tinyfacts", "--n", "4", "--kind", "block",
                 "--samples", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 1 <= summary["records"] <= 4 and summary["of"] == 4
    info = json.loads((out / "trace_block.json").read_text())
    assert len(info["category_effect"]) == 2 and len(info["category_effect"][0]) == 6
    assert (out / "trace_block.png").exists()
    assert "pick this layer" in capsys.readouterr().out


def test_cli_one_line_errors(tmp_path: Path, capsys) -> None:
    from lit_edit.trace import main

    assert main(["--model", "tinyfacts", "--prompt", PROMPT, "--subject", "Bob Ray",
                 "--out", str(tmp_path)]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert len(errors) == 1 and "subject 'Bob Ray' does not occur in prompt" in errors[0]
    assert main(["--model", "tinyfacts", "--subject", SUBJECT]) == 2
    assert capsys.readouterr().err.strip() == "error: give either --prompt and --subject, or --data"


def test_cli_reads_a_records_file(tmp_path: Path, capsys) -> None:
    from lit_edit.trace import main

    rows = [{"src": "Where was Ana Lo born?", "alt": "Rome", "answers": ["Paris"],
             "subject": "Ana Lo", "rephrase": "Ana Lo was born in", "loc": "x", "loc_ans": "y"},
            {"src": "Who employs Mounaeth Reimok?", "alt": "Acme", "answers": ["Zeta"],
             "subject": "Mounaeth Reimok", "rephrase": "Mounaeth Reimok works for",
             "loc": "x", "loc_ans": "y"}]
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    out = tmp_path / "file"
    assert main(["--model", "tinyfacts", "--data", str(path), "--all-records", "--kind", "attn",
                 "--window", "1", "--samples", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == summary["of"] == 2
    assert len(summary["kinds"]["attn"]["subject_last_effect"]) == 2
    assert "pick this layer" in capsys.readouterr().out
