"""Cached layer statistics (lit_edit/nn/layer_stats.py) on a random-init tiny GPT-2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from lit_edit.nn.layer_stats import (
    LayerStatsCache,
    StatsKey,
    input_second_moment,
    input_second_moments,
    model_fingerprint,
    moment_without,
    moments_without,
    texts_fingerprint,
)

WORDS = "<pad> a b c d e f g h".split()
TEXTS = ["a b c", "d e", "f g h a b", "c", "h h g"]
LAYER = "transformer.h.1.mlp.c_proj"


@pytest.fixture
def lm() -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    tokenizer.padding_side = "right"
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=8, n_head=2, n_positions=16, vocab_size=len(WORDS),
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config).eval(), tokenizer


def keys_by_hand(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """The layer's input at every token, one text at a time (no padding anywhere)."""
    rows = []
    module = dict(model.named_modules())[LAYER]
    for text in TEXTS:
        seen = []
        handle = module.register_forward_hook(lambda _m, a, _o, seen=seen: seen.append(a[0][0]))
        with torch.no_grad():
            model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
        handle.remove()
        rows.append(seen[0])
    return torch.cat(rows)  # (tokens, 32): c_proj's input is the 4·n_embd MLP activation


def test_second_moment_equals_the_mean_outer_product_over_real_tokens(lm) -> None:
    model, tokenizer = lm
    keys = keys_by_hand(model, tokenizer).double()
    want = sum(torch.outer(k, k) for k in keys) / len(keys)
    moment, n = input_second_moment(model, tokenizer, LAYER, TEXTS, max_tokens=10_000,
                                    batch_size=2)
    tokenizer.padding_side = "left"  # the statistic pads on the right whatever the tokenizer says
    left, _ = input_second_moment(model, tokenizer, LAYER, TEXTS, max_tokens=10_000, batch_size=2)
    assert torch.equal(left, moment)
    assert n == 14 == len(keys)  # 3 + 2 + 5 + 1 + 3 tokens; padding excluded
    assert moment.shape == (32, 32)
    torch.testing.assert_close(moment.double(), want, rtol=1e-5, atol=1e-6)


def test_token_budget_cuts_exactly(lm) -> None:
    model, tokenizer = lm
    keys = keys_by_hand(model, tokenizer).double()[:4]
    moment, n = input_second_moment(model, tokenizer, LAYER, TEXTS, max_tokens=4, batch_size=2)
    assert n == 4
    torch.testing.assert_close(moment.double(), keys.T @ keys / 4, rtol=1e-5, atol=1e-6)


def test_bad_arguments_fail_clearly(lm) -> None:
    model, tokenizer = lm
    with pytest.raises(ValueError, match="no module 'transformer.h.9.mlp'"):
        input_second_moment(model, tokenizer, "transformer.h.9.mlp", TEXTS, 10)
    with pytest.raises(ValueError, match="max_tokens must be > 0"):
        input_second_moment(model, tokenizer, LAYER, TEXTS, 0)


def test_cache_computes_once_and_refuses_a_foreign_file(lm, tmp_path: Path) -> None:
    model, tokenizer = lm
    key = StatsKey(model=f"tiny@{model_fingerprint(model)}", layer=LAYER,
                   corpus=texts_fingerprint(TEXTS), max_tokens=100, max_length=16)
    cache = LayerStatsCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return input_second_moment(model, tokenizer, LAYER, TEXTS, 100, max_length=16)

    first = cache.get(key, compute)
    second = cache.get(key, compute)
    assert len(calls) == 1 and torch.equal(first, second)
    other = StatsKey(**{**key.__dict__, "max_tokens": 5})
    assert cache.path(other) != cache.path(key)
    cache.path(key).replace(cache.path(other))  # a file that does not hold what its name says
    with pytest.raises(ValueError, match="recorded key"):
        cache.get(other, compute)


def test_fingerprints_follow_the_weights(lm) -> None:
    model, _ = lm
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-6
    assert model_fingerprint(model) != before
    assert texts_fingerprint(["ab", "c"]) != texts_fingerprint(["a", "bc"])


def test_corpus_files_are_read_in_full_with_located_errors(tmp_path: Path) -> None:
    """.txt, .jsonl and .parquet corpora give the same documents; bad ones name file and line."""
    import datasets

    from lit_edit.nn.corpus_moments import read_corpus
    from lit_edit.records import DataFileError

    docs = ["The first document.", "A second one, longer than the first.", "Third."]
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join([docs[0], "", docs[1], docs[2]]) + "\n", encoding="utf-8")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(f'{{"text": "{d}", "id": {i}}}\n' for i, d in enumerate(docs)))
    parquet = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"text": docs, "id": [0, 1, 2]}).to_parquet(str(parquet))
    for path in (txt, jsonl, parquet):
        assert read_corpus(str(path), "unused") == docs
    assert read_corpus(str(jsonl), "unused", column="text") == docs

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    with pytest.raises(DataFileError, match=r"bad\.jsonl: line 2 is not a JSON object with a"):
        read_corpus(str(bad), "unused")
    with pytest.raises(DataFileError, match=r"missing\.txt: no such corpus file"):
        read_corpus(str(tmp_path / "missing.txt"), "unused")
    with pytest.raises(DataFileError, match=r"has no column 'body' \(columns: text, id\)"):
        read_corpus(str(parquet), "unused", column="body")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataFileError, match="holds no text"):
        read_corpus(str(empty), "unused")
    with pytest.raises(DataFileError, match="expected hf://ORG/NAME:SPLIT"):
        read_corpus("hf://wikipedia", "unused")


def test_a_hub_corpus_offline_fails_in_one_line(monkeypatch) -> None:
    """No hub here: the error names the corpus and says why, instead of a traceback."""
    from lit_edit.nn.corpus_moments import read_corpus
    from lit_edit.records import DataFileError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataFileError, match=r"hf://wikimedia/wikipedia:20231101\.en:train\[:10\]: "
                       "cannot load with `datasets`"):
        read_corpus("hf://wikimedia/wikipedia:20231101.en:train[:10]", "unused")


def test_the_forward_stops_at_the_layer(lm) -> None:
    """The blocks above the measured layer are not run (and the moment is unchanged)."""
    model, tokenizer = lm
    calls: list[int] = []
    top = model.transformer.h[-1]
    handle = top.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        input_second_moment(model, tokenizer, "transformer.h.0.mlp.c_proj", ["a b c", "b c"], 100)
    finally:
        handle.remove()
    assert calls == []


def test_several_layers_in_one_pass_give_each_layers_own_moment_bit_for_bit(lm) -> None:
    """One pass for the moments of blocks 0 and 1 (and the subtraction) equals one per layer."""
    model, tokenizer = lm
    layers = ["transformer.h.1.mlp.c_proj", "transformer.h.0.mlp.c_proj"]  # not forward order
    for budget in (10_000, 7):  # the whole corpus, and a budget cut inside a batch
        together, n = input_second_moments(model, tokenizer, layers, TEXTS, budget, batch_size=2)
        for layer, moment in zip(layers, together, strict=True):
            alone, n_alone = input_second_moment(model, tokenizer, layer, TEXTS, budget,
                                                 batch_size=2)
            assert n == n_alone and torch.equal(moment, alone)
    full = [input_second_moment(model, tokenizer, layer, TEXTS, 10_000) for layer in layers]
    without = moments_without(full, model, tokenizer, layers, TEXTS[:2])
    for layer, (moment, n), got in zip(layers, full, without, strict=True):
        assert torch.equal(got, moment_without(moment, n, model, tokenizer, layer, TEXTS[:2]))
    assert moments_without(full, model, tokenizer, layers, []) == [m for m, _ in full]
    with pytest.raises(ValueError, match="distinct"):
        input_second_moments(model, tokenizer, [layers[0], layers[0]], TEXTS, 10)
