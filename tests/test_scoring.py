"""Tests of the batched teacher-forced scorer and the generation loops."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import CausalLMOutput

from lit_edit.records import QAPair
from lit_edit.scoring import (
    PairScore,
    Scorer,
    generate_answers,
    greedy_generate,
    sample_top_k,
)
from lit_edit.tokenization import encode_pair

# ----------------------------------------------------------------------------------- fixtures

CORPUS = [
    "The capital of France is Paris.",
    "Alice Martin was born in Lyon and works for Acme Corporation.",
    "Q: Who is the chief executive of Acme? A: Bob Smith",
    "The Eiffel Tower is located in the city of Paris, France.",
    "Carol speaks Spanish and lives in the city of Madrid.",
    "Dave Jones plays the violin and the piano.",
]
SPECIALS = ["<pad>", "<s>", "</s>"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run much faster on one thread (no OpenMP spin on a shared 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _bpe(bos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    if bos:  # LLaMA-like: BOS prepended, explicit pad token
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", SPECIALS.index("<s>"))]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    # GPT-2-like: no BOS added, no pad token (pads with EOS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def gpt2_tok() -> PreTrainedTokenizerFast:
    return _bpe(bos=False)


@pytest.fixture(scope="module")
def llama_tok() -> PreTrainedTokenizerFast:
    return _bpe(bos=True)


def _gpt2(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()


def _llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, gpt2_tok, llama_tok) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    if request.param == "gpt2":
        return _gpt2(len(gpt2_tok)), gpt2_tok
    return _llama(len(llama_tok)), llama_tok


PAIRS = [
    QAPair("The capital of France is", "Paris"),
    QAPair("Alice Martin was born in", "Lyon and works for Acme"),
    QAPair("Q: Who is the chief executive of Acme? A:", "Bob Smith"),
    QAPair("Carol speaks", "Spanish"),
    QAPair("The Eiffel Tower is located in the city of Paris, France. Dave plays the", "violin"),
    QAPair("The capital of France is", "Paris"),  # duplicate
]

# Word-level tokenizer with hand-known ids for the fake model tests.
WORDS = ["<pad>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "red", "hat"]
V = len(WORDS)


def _word_tok(bos: bool = False) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


class FakeLM(nn.Module):
    """Hand-designed logits: 3.0 on one token, 0 elsewhere.

    With ``shift_by_position`` the favoured token after token ``x`` at position ``p`` is
    ``(x + p) % V`` (so wrong position ids change the predictions); otherwise it is
    ``table[x]``. No key/value cache.
    """

    def __init__(self, shift_by_position: bool = True, table: dict[int, int] | None = None):
        super().__init__()
        self.shift_by_position = shift_by_position
        self.table = table or {}
        self.weight = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.calls: list[tuple[int, int]] = []
        self.seen_training: list[bool] = []
        self.seen_inference: list[bool] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        self.calls.append(tuple(input_ids.shape))
        self.seen_training.append(self.training)
        self.seen_inference.append(torch.is_inference_mode_enabled())
        assert attention_mask is not None and position_ids is not None
        if self.shift_by_position:
            favoured = (input_ids + position_ids) % V
        else:
            favoured = input_ids.clone().apply_(lambda x: self.table.get(x, 0))
        logits = torch.zeros(*input_ids.shape, V)
        logits.scatter_(-1, favoured[..., None], 3.0)
        return logits if not self.table else CausalLMOutput(logits=logits)


HIT = 3.0 - math.log(math.exp(3.0) + V - 1)  # log p of the favoured token
MISS = -math.log(math.exp(3.0) + V - 1)  # log p of any other token


# ----------------------------------------------------------------------------------- scorer


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_fake_model_alignment_by_hand(padding_side):
    tok = _word_tok()
    model = FakeLM()
    pairs = [
        # ids: the=3 cat=4 sat=5 on=6 | the=3 mat=7 ; answer positions 4, 5
        # position 3 (token on=6) favours (6+3)%10 = 9 (hat) != the ; position 4 (the=3) -> 7 mat
        QAPair("the cat sat on", "the mat"),
        # ids: cat=4 | sat=5 on=6 ; position 0 (cat=4) favours 4 != sat ; position 1 (sat=5) -> 6 on
        QAPair("cat", "sat on"),
        # ids: red=8 | hat=9 ; position 0 favours 8 != hat
        QAPair("red", "hat"),
    ]
    scores = Scorer(batch_size=8, padding_side=padding_side).score(model, tok, pairs)
    assert len(model.calls) == 1 and model.calls[0] == (3, 6)  # one forward, padded to 6
    expected = [
        ([3, 7], [9, 7], [MISS, HIT]),
        ([5, 6], [4, 6], [MISS, HIT]),
        ([9], [8], [MISS]),
    ]
    for score, pair, (answer, pred, logp) in zip(scores, pairs, expected, strict=True):
        assert score.pair == pair
        assert score.answer_ids.tolist() == answer
        assert score.pred_ids.tolist() == pred
        torch.testing.assert_close(score.logprobs, torch.tensor(logp), rtol=0, atol=1e-6)
    assert [s.token_accuracy for s in scores] == [0.5, 0.5, 0.0]
    assert scores[0].nll == pytest.approx(-(MISS + HIT) / 2)
    assert scores[2].perplexity == pytest.approx(math.exp(-MISS))
    assert not scores[0].exact


def test_fake_model_bos_is_never_a_label():
    tok = _word_tok(bos=True)
    model = FakeLM()
    [score] = Scorer().score(model, tok, [QAPair("cat", "sat on")])
    # ids: <s>=1 cat=4 | sat=5 on=6 ; position 1 (cat) favours 5 = sat, position 2 (sat) -> 7
    assert score.answer_ids.tolist() == [5, 6]
    assert score.pred_ids.tolist() == [5, 7]
    assert score.token_accuracy == 0.5


def test_batching_sorting_dedup_and_mode_restore():
    tok = _word_tok()
    model = FakeLM()
    model.train()
    model.frozen = nn.Dropout().eval()  # a submodule in another mode stays in it
    pairs = [
        QAPair("red", "hat"),
        QAPair("the cat sat on", "the mat"),
        QAPair("red", "hat", aliases=("mat",)),  # same (prompt, answer): scored once
        QAPair("cat", "sat on"),
        QAPair("the", "cat sat on the mat"),
    ]
    scores = Scorer(batch_size=2).score(model, tok, pairs)
    # 4 distinct sequences of lengths 2, 6, 3, 6 -> batches {6, 6} then {3, 2}
    assert model.calls == [(2, 6), (2, 3)]
    assert model.training and not any(model.seen_training) and all(model.seen_inference)
    assert not model.frozen.training
    assert [s.pair for s in scores] == pairs
    assert scores[2].pair.aliases == ("mat",)
    assert torch.equal(scores[0].logprobs, scores[2].logprobs)
    assert not scores[0].logprobs.is_inference()
    assert Scorer().score(model, tok, []) == []


def test_pair_score_validation():
    with pytest.raises(ValueError):
        PairScore(torch.tensor([1, 2]), torch.tensor([1]), torch.tensor([0.0]))
    with pytest.raises(ValueError):
        PairScore(torch.tensor([], dtype=torch.long), torch.tensor([]), torch.tensor([]))
    with pytest.raises(ValueError):
        Scorer(padding_side="middle")


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_rows_score_like_solo(lm, padding_side):
    model, tok = lm
    batched = Scorer(batch_size=4, padding_side=padding_side).score(model, tok, PAIRS)
    solo = Scorer(batch_size=1).score(model, tok, PAIRS)
    for b, s in zip(batched, solo, strict=True):
        assert torch.equal(b.answer_ids, s.answer_ids)
        assert torch.equal(b.pred_ids, s.pred_ids)
        torch.testing.assert_close(b.logprobs, s.logprobs, rtol=0, atol=1e-5)


def test_scores_match_direct_forward(lm):
    """Log-probs and argmax equal a direct unpadded forward; mean NLL equals HF's label loss."""
    model, tok = lm
    scores = Scorer(batch_size=3).score(model, tok, PAIRS)
    for pair, score in zip(PAIRS, scores, strict=True):
        enc = encode_pair(tok, pair.prompt, pair.answer)
        ids = torch.tensor([enc.input_ids])
        labels = torch.tensor([[-100] * len(enc.prompt_ids) + enc.answer_ids])
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
        t = len(enc.answer_ids)
        logp = out.logits[0, -t - 1 : -1].log_softmax(-1)
        assert score.answer_ids.tolist() == enc.answer_ids
        assert score.pred_ids.tolist() == logp.argmax(-1).tolist()
        torch.testing.assert_close(
            score.logprobs,
            logp.gather(-1, score.answer_ids[:, None]).squeeze(-1),
            atol=1e-5,
            rtol=0,
        )
        assert score.nll == pytest.approx(out.loss.item(), abs=1e-5)


def test_tokenizer_not_mutated(gpt2_tok, llama_tok):
    model = _gpt2(len(gpt2_tok))
    for tok in (gpt2_tok, llama_tok):
        before = (tok.padding_side, tok.pad_token, tok.truncation_side, len(tok))
        Scorer(padding_side="left").score(model, tok, PAIRS)
        greedy_generate(model, tok, ["The capital of"], 3)
        assert (tok.padding_side, tok.pad_token, tok.truncation_side, len(tok)) == before
    assert gpt2_tok.pad_token is None


def test_max_length_keeps_answer_and_bos(llama_tok):
    model = _llama(len(llama_tok))
    pair = PAIRS[4]
    enc = encode_pair(llama_tok, pair.prompt, pair.answer)
    t = len(enc.answer_ids)
    [score] = Scorer(max_length=t + 4).score(model, llama_tok, [pair])
    kept = [enc.prompt_ids[0], *enc.prompt_ids[-3:], *enc.answer_ids]
    assert enc.prompt_ids[0] == llama_tok.bos_token_id
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([kept])).logits[0, -t - 1 : -1]
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(enc.answer_ids)[:, None])
    torch.testing.assert_close(score.logprobs, expected.squeeze(-1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not fit"):
        Scorer(max_length=t + 1).score(model, llama_tok, [pair])



def test_exact_match_generation_truncates_like_scoring(llama_tok):
    """With max_length, greedy answers continue the same left-truncated prompt (BOS kept)."""
    model = _llama(len(llama_tok))
    pair = PAIRS[4]
    enc = encode_pair(llama_tok, pair.prompt, pair.answer)
    t = len(enc.answer_ids)
    [answer] = Scorer(max_length=t + 4).generate_answers(model, llama_tok, [pair])
    kept = [enc.prompt_ids[0], *enc.prompt_ids[-3:]]
    assert answer.new_ids.tolist() == _reference_greedy(model, kept, t)[: len(answer.new_ids)]
    with pytest.raises(ValueError, match="does not fit"):
        Scorer(max_length=t + 1).generate_answers(model, llama_tok, [pair])


# ----------------------------------------------------------------------------------- generation


def _reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """No cache, no padding: recompute the whole sequence at each step."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def test_greedy_batched_equals_solo_and_reference(lm):
    model, tok = lm
    prompts = [p.prompt for p in PAIRS]
    batched = greedy_generate(model, tok, prompts, 6, batch_size=4, stop_at_eos=False)
    solo = greedy_generate(model, tok, prompts, 6, batch_size=1, stop_at_eos=False)
    for b, s, prompt in zip(batched, solo, prompts, strict=True):
        assert b.prompt == prompt
        assert b.new_ids.tolist() == s.new_ids.tolist()
        ids = tok(prompt)["input_ids"]
        assert b.prompt_ids.tolist() == ids
        assert b.new_ids.tolist() == _reference_greedy(model, ids, 6)
        assert b.text == tok.decode(b.new_ids.tolist(), skip_special_tokens=True)


def test_greedy_fake_model_stops_at_eos_by_hand():
    tok = _word_tok()
    # on -> the -> mat -> </s> ; cat -> sat -> on
    table = {6: 3, 3: 7, 7: 2, 4: 5, 5: 6, 8: 9, 9: 8}
    model = FakeLM(shift_by_position=False, table=table)
    gens = greedy_generate(model, tok, ["the cat sat on", "cat", "red"], 4, batch_size=2)
    assert [g.new_ids.tolist() for g in gens] == [[3, 7], [5, 6, 3, 7], [9, 8, 9, 8]]
    assert [g.text for g in gens] == ["the mat", "sat on the mat", "hat red hat red"]
    assert gens[0].full_text == "the cat sat on the mat"
    kept = greedy_generate(model, tok, ["the cat sat on"], 4, stop_at_eos=False)[0]
    assert kept.new_ids.tolist()[:3] == [3, 7, 2]


def test_generate_answers_cuts_each_candidate_by_hand():
    tok = _word_tok()
    table = {6: 3, 3: 7, 7: 2, 4: 5, 5: 6}
    model = FakeLM(shift_by_position=False, table=table)
    pairs = [
        QAPair("the cat sat on", "the mat", aliases=("the red hat", "the")),
        QAPair("cat", "sat"),
    ]
    answers = generate_answers(model, tok, pairs)
    assert answers[0].candidates == ("the mat", "the red hat", "the")
    assert answers[0].new_ids.tolist() == [3, 7]  # EOS after 2 of the 3 tokens
    assert answers[0].continuations == ("the mat", "the mat", "the")
    assert answers[1].continuations == ("sat",)
    assert Scorer().generate_answers(model, tok, pairs)[1].new_ids.tolist() == [5]


def test_top_k_sampling_is_seeded_and_batch_independent(lm):
    model, tok = lm
    prompts = ["The capital of France is", "Carol", "Q: Who is the chief executive of Acme? A:"]
    a = sample_top_k(model, tok, prompts, max_length=20, seed=3, batch_size=3)
    b = sample_top_k(model, tok, prompts[::-1], max_length=20, seed=3, batch_size=1)[::-1]
    c = sample_top_k(model, tok, prompts, max_length=20, seed=4, batch_size=3)
    for x, y in zip(a, b, strict=True):
        assert x.new_ids.tolist() == y.new_ids.tolist()
        assert len(x.prompt_ids) + len(x.new_ids) == max(20, len(x.prompt_ids))
        assert x.full_text.startswith(x.prompt[:5])
    assert a[1].new_ids.numel() > 10
    assert [x.new_ids.tolist() for x in a] != [x.new_ids.tolist() for x in c]
    greedy = greedy_generate(model, tok, prompts, 5, stop_at_eos=False)
    top1 = Scorer().sample(model, tok, prompts, max_length=100, top_k=1)
    for g, s in zip(greedy, top1, strict=True):
        assert s.new_ids.tolist()[:5] == g.new_ids.tolist()


def test_top_k_sampling_stays_in_top_k():
    tok = _word_tok()

    class Ramp(nn.Module):
        """Logits increase with the token id: the top 5 are ids 5..9."""

        def forward(self, input_ids, **kwargs):
            return (0.1 * torch.arange(V, dtype=torch.float)).expand(*input_ids.shape, V)

    gens = sample_top_k(Ramp(), tok, ["the", "cat"], max_length=60, top_k=5, seed=0)
    drawn = [t for g in gens for t in g.new_ids.tolist()]
    assert len(drawn) == 2 * 59 and set(drawn) == {5, 6, 7, 8, 9}
    assert sample_top_k(Ramp(), tok, ["the cat"], max_length=2)[0].new_ids.numel() == 0


def test_logits_to_keep_is_used_only_where_the_model_takes_it(lm):
    """HF models (and wrappers exposing them as ``base_model``) take it; plain modules don't."""
    from lit_edit.scoring.utils import accepts_logits_to_keep

    model, _ = lm

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.base_model = inner

        def forward(self, **kwargs):
            return self.base_model(**kwargs)

    assert accepts_logits_to_keep(model)
    assert accepts_logits_to_keep(Wrapper(model))
    assert not accepts_logits_to_keep(torch.nn.Linear(2, 2))


def _short_gpt2(vocab: int, positions: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return GPT2LMHeadModel(config).eval()


def test_generation_near_the_position_table_runs_no_row_past_its_budget(gpt2_tok):
    long_prompt = "Alice Martin was born in Lyon and works for Acme Corporation."
    n_long = len(encode_pair(gpt2_tok, long_prompt, "Paris").prompt_ids)
    n_answer = len(encode_pair(gpt2_tok, long_prompt, "Paris").answer_ids)
    model = _short_gpt2(len(gpt2_tok), n_long + n_answer)  # the long pair just fits
    pairs = [QAPair(long_prompt, "Paris"),
             QAPair("The capital of", "France is Paris, France.")]  # a short prompt, long answer
    budgets = [len(encode_pair(gpt2_tok, p.prompt, p.answer).answer_ids) for p in pairs]
    assert budgets[1] > budgets[0]  # the batch decodes past the long row's own budget
    batched = generate_answers(model, gpt2_tok, pairs, batch_size=2)
    solo = [generate_answers(model, gpt2_tok, [p], batch_size=1)[0] for p in pairs]
    assert [a.new_ids.tolist() for a in batched] == [a.new_ids.tolist() for a in solo]


def test_sequences_longer_than_the_position_table_are_refused_by_name(gpt2_tok):
    model = _short_gpt2(len(gpt2_tok), 8)
    pair = QAPair("Alice Martin was born in Lyon and works for Acme Corporation.", "Paris")
    with pytest.raises(ValueError, match=r"'Alice Martin.*needs \d+ positions and the model has 8"):
        Scorer().score(model, gpt2_tok, [pair])
    with pytest.raises(ValueError, match="evaluation.max_length"):
        generate_answers(model, gpt2_tok, [pair])
    assert len(Scorer(max_length=8).score(model, gpt2_tok, [pair])) == 1  # truncation fits it
