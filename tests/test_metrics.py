"""Tests of the editing metrics, with expected values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from lit_edit.metrics import (
    CounterFactRecordScores,
    CounterFactScores,
    ExactMatch,
    LocalityAgreement,
    NGramEntropy,
    Perplexity,
    TokenAccuracy,
    answer_matches,
    contrast,
    harmonic_mean,
    ngram_entropy,
    record_agreement,
    record_mean,
    record_token_accuracy,
    token_accuracy,
    word_tokenize,
)
from lit_edit.records import QAPair
from lit_edit.scoring import GeneratedAnswer, PairScore, Scorer

H_2_1 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # entropy of (2/3, 1/3)


def ps(answer: list[int], pred: list[int], logprobs: list[float] | None = None) -> PairScore:
    """A hand-made pair score."""
    lp = logprobs if logprobs is not None else [-1.0] * len(answer)
    return PairScore(torch.tensor(answer), torch.tensor(pred), torch.tensor(lp))


def acc(value: float) -> PairScore:
    """A pair score with the given token accuracy (over 6 tokens)."""
    hits = round(value * 6)
    return ps([1] * 6, [1] * hits + [0] * (6 - hits))


def nll(value: float) -> PairScore:
    return ps([1], [1], [-value])


def gen(candidates: tuple[str, ...], continuations: tuple[str, ...]) -> GeneratedAnswer:
    return GeneratedAnswer(
        QAPair("p", candidates[0], candidates[1:]), torch.tensor([1]), candidates, continuations
    )


# ----------------------------------------------------------------------------------- accuracy


def test_token_accuracy_function_with_padding():
    pred = torch.tensor([[5, 6, 7], [5, 9, 9], [1, 1, 1]])
    labels = torch.tensor([[5, 0, 7], [-100, 9, 8], [-100, -100, -100]])
    out = token_accuracy(pred, labels)
    torch.testing.assert_close(out[:2], torch.tensor([2 / 3, 1 / 2]))
    assert math.isnan(out[2])
    assert token_accuracy(torch.tensor([3, 4, 5]), torch.tensor([3, 0, 0])).item() == pytest.approx(
        1 / 3
    )
    with pytest.raises(ValueError):
        token_accuracy(torch.tensor([1, 2]), torch.tensor([1]))


def test_pair_score_properties_by_hand():
    s = ps([4, 5, 6], [4, 0, 0], [-0.1, -2.0, -0.9])
    assert s.token_accuracy == pytest.approx(1 / 3)
    assert not s.exact
    assert s.nll == pytest.approx(1.0)
    assert s.perplexity == pytest.approx(math.e)


def _accuracy_records():
    return [
        # flat record: a 3-token answer with 1/3 right and a 1-token answer right -> 2/3
        [ps([4, 5, 6], [4, 0, 0]), ps([7], [7])],
        # grouped: keys -> mean(2/3, 0) = 1/3 ; pairs -> 2/4 = 1/2
        {"Reasoning": [acc(1), acc(0), acc(1)], "Subject_Aliasing": [acc(0)], "Empty": []},
        # no portability at all -> excluded, counted in n_empty
        {},
        {"Reasoning": []},
    ]


def test_token_accuracy_metric_by_hand():
    metric = TokenAccuracy()
    metric.update(_accuracy_records())
    assert metric.compute().item() == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert int(metric.n_records) == 2 and int(metric.n_empty) == 2 and int(metric.n_pairs) == 6

    pairs = TokenAccuracy(aggregation="pairs")
    pairs.update(_accuracy_records())
    assert pairs.compute().item() == pytest.approx((2 / 3 + 1 / 2) / 2)

    strict = TokenAccuracy(strict=True)
    strict.update(_accuracy_records())
    assert strict.compute().item() == pytest.approx((1 / 2 + 1 / 3) / 2)

    assert record_token_accuracy(_accuracy_records()[1]) == pytest.approx(1 / 3)
    assert record_token_accuracy({}) is None
    with pytest.raises(ValueError):
        TokenAccuracy(aggregation="records")


def test_empty_metric_is_nan():
    metric = TokenAccuracy()
    metric.update([[], {}])
    assert math.isnan(metric.compute().item()) and int(metric.n_empty) == 2


def test_record_mean_rejects_strings():
    assert record_mean([0.0, 1.0]) == 0.5
    with pytest.raises(TypeError):
        record_mean("abc")  # type: ignore[arg-type]


def test_locality_agreement_by_hand():
    pre = [
        {"Relation_Specificity": [ps([1, 2, 3], [1, 9, 3])], "Forgetfulness": [ps([4], [4])]},
        [ps([5, 6], [0, 0])],
        {},
    ]
    post = [
        # 2/3 agree (one token changed) and 0/1 -> keys mean (2/3 + 0) / 2 = 1/3
        {"Relation_Specificity": [ps([1, 2, 3], [1, 9, 8])], "Forgetfulness": [ps([4], [5])]},
        # agreement, not correctness: both wrong but equal -> 1
        [ps([5, 6], [0, 0])],
        {},
    ]
    metric = LocalityAgreement()
    metric.update(pre, post)
    assert metric.compute().item() == pytest.approx((1 / 3 + 1) / 2)
    assert int(metric.n_empty) == 1
    assert record_agreement(pre[0], post[0], "pairs") == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="answer tokens"):
        metric.update([[ps([1], [1])]], [[ps([2], [1])]])
    with pytest.raises(ValueError, match="groups differ"):
        metric.update([{"a": [ps([1], [1])]}], [{"b": [ps([1], [1])]}])
    with pytest.raises(ValueError):
        metric.update([[]], [])


def test_exact_match_by_hand():
    assert answer_matches(gen(("Paris",), (" Paris ",)))
    assert not answer_matches(gen(("Paris",), ("paris",)))
    assert answer_matches(gen(("Paris",), ("paris",)), ignore_case=True)
    assert answer_matches(gen(("New York", "NYC"), ("New Jersey", "NYC")))  # an alias
    assert not answer_matches(gen(("New York", "NYC"), ("New Jersey", "New")))
    records = [
        [gen(("Paris",), ("Paris",)), gen(("Lyon",), ("Lille",)), gen(("Rome",), ("ROME",))],
        {"Subject_Aliasing": [gen(("Bob",), ("Bob",))], "Reasoning": [gen(("x",), ("y",))]},
        [],
    ]
    metric = ExactMatch()
    metric.update(records)
    assert metric.compute().item() == pytest.approx((1 / 3 + 1 / 2) / 2)
    ignore = ExactMatch(ignore_case=True)
    ignore.update(records)
    assert ignore.compute().item() == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert int(ignore.n_empty) == 1


# ----------------------------------------------------------------------------------- fluency


def test_word_tokenize_approximates_nltk():
    assert word_tokenize("Alice doesn't live in Paris. She moved to Lyon, France.") == [
        "Alice", "does", "n't", "live", "in", "Paris", ".", "She", "moved", "to", "Lyon", ",",
        "France", ".",
    ]  # fmt: skip
    assert word_tokenize('He said, "I can\'t go!" Mr. Smith left (quickly)...') == [
        "He", "said", ",", "``", "I", "ca", "n't", "go", "!", "''", "Mr.", "Smith", "left", "(",
        "quickly", ")", "...",
    ]  # fmt: skip
    assert word_tokenize("The U.S. Army's 1,000 men cost $3.88 -- gonna win.") == [
        "The", "U.S.", "Army", "'s", "1,000", "men", "cost", "$", "3.88", "--", "gon", "na",
        "win", ".",
    ]  # fmt: skip
    assert word_tokenize("") == []


def test_ngram_entropy_by_hand():
    # tokens a b a b: bigrams ab x2, ba x1 -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1
    expected = (2 / 3 * H_2_1 + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected)
    # punctuation is a word: Paris . Paris . has the same n-gram structure
    assert ngram_entropy("Paris. Paris.") == pytest.approx(expected)
    # one word: no bigram, no trigram -> 0 ; two words: H2 = 0 (one bigram), no trigram
    assert ngram_entropy("word") == 0.0
    assert ngram_entropy("two words") == 0.0
    # four distinct words: H2 = log2 3, H3 = 1
    assert ngram_entropy("a b c d") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3) / 2)

    metric = NGramEntropy()
    metric.update(["a b a b", ["a b c d", "word"], []])
    record0 = expected
    record1 = ((2 / 3 * math.log2(3) + 4 / 3) / 2 + 0.0) / 2
    assert metric.compute().item() == pytest.approx((record0 + record1) / 2)
    assert int(metric.n_empty) == 1


# ----------------------------------------------------------------------------------- counterfact


def test_counterfact_scores_by_hand():
    # record A: rewrite success; paraphrases 1 of 4 succeed; neighborhood keeps the truth
    # record B: rewrite fails; no paraphrase; 2 neighborhood prompts keep the truth
    a = CounterFactRecordScores(
        rewrite=[(nll(0.5), nll(1.0))],
        paraphrase=[
            (nll(2.0), nll(1.0)),
            (nll(1.0), nll(1.0)),  # tie: not a success
            (nll(3.0), nll(0.1)),
            (nll(0.1), nll(0.3)),
        ],
        neighborhood=[(nll(2.0), nll(0.5))],
    )
    b = CounterFactRecordScores(
        rewrite=[(nll(1.0), nll(0.5))],
        neighborhood=[(nll(0.7), nll(0.2)), (nll(0.9), nll(0.6))],
    )
    metric = CounterFactScores()
    metric.update([a, b])
    out = {k: v.item() for k, v in metric.compute().items()}
    e = math.exp
    assert out["ES"] == pytest.approx(0.5)
    assert out["EM"] == pytest.approx(((e(-0.5) - e(-1.0)) + (e(-1.0) - e(-0.5))) / 2)
    assert out["PS"] == pytest.approx(0.25)
    pm = ((e(-2) - e(-1)) + 0 + (e(-3) - e(-0.1)) + (e(-0.1) - e(-0.3))) / 4
    assert out["PM"] == pytest.approx(pm)
    assert out["NS"] == pytest.approx(1.0)
    nm_b = ((e(-0.2) - e(-0.7)) + (e(-0.6) - e(-0.9))) / 2
    assert out["NM"] == pytest.approx(((e(-0.5) - e(-2.0)) + nm_b) / 2)
    assert out["S"] == pytest.approx(3 / (1 / 0.5 + 1 / 0.25 + 1 / 1.0))  # 3/7


def test_counterfact_uses_length_normalised_nll():
    # new: mean NLL 0.4 (sum 0.8); true: 0.5 -> success with the mean, failure with the sum
    new, true = ps([1, 2], [1, 2], [-0.2, -0.6]), ps([3], [3], [-0.5])
    assert contrast(new.nll, true.nll) == (1.0, pytest.approx(math.exp(-0.4) - math.exp(-0.5)))
    assert contrast(new.nll, true.nll, neighborhood=True)[0] == 0.0
    metric = CounterFactScores()
    metric.update([CounterFactRecordScores(rewrite=[(new, true)])])
    out = metric.compute()
    assert out["ES"].item() == 1.0 and math.isnan(out["PS"].item()) and math.isnan(out["S"])


def test_harmonic_mean():
    assert harmonic_mean([0.5, 0.25, 1.0]) == pytest.approx(3 / 7)
    assert harmonic_mean([0.5, 0.0, 1.0]) == 0.0
    assert math.isnan(harmonic_mean([]))


# ----------------------------------------------------------------------------------- perplexity


def test_perplexity_by_hand():
    metric = Perplexity()
    metric.update([ps([1, 2], [0, 0], [-1.0, -2.0]), [nll(1.0), ps([1, 2], [1, 2], [-1, -4])], []])
    # exp(1.5) and exp((1 + 1 + 4) / 3) = exp(2)
    assert metric.compute().item() == pytest.approx((math.exp(1.5) + math.exp(2.0)) / 2)
    assert int(metric.n_empty) == 1 and not metric.higher_is_better


# ----------------------------------------------------------------------------------- distributed


def _split_cases():
    records = _accuracy_records()
    cf = [
        CounterFactRecordScores(rewrite=[(nll(0.5), nll(1.0))], neighborhood=[(nll(2), nll(1))]),
        CounterFactRecordScores(rewrite=[(nll(1.0), nll(0.5))], paraphrase=[(nll(1), nll(2))]),
        CounterFactRecordScores(paraphrase=[(nll(3), nll(2))], neighborhood=[(nll(1), nll(2))]),
    ]
    gens = [[gen(("a",), ("a",))], [gen(("b",), ("c",)), gen(("d",), ("d",))], []]
    return [
        (TokenAccuracy, (records,)),
        (LocalityAgreement, (records, records)),
        (ExactMatch, (gens,)),
        (NGramEntropy, (["a b a b", ["a b c", "x y x y x"], [], "one two"],)),
        (CounterFactScores, (cf,)),
        (Perplexity, ([nll(0.5), [nll(1.0), nll(2.0)], [], nll(0.1)],)),
    ]


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
@pytest.mark.parametrize("metric_cls, args", _split_cases())
def test_merged_states_equal_one_instance(metric_cls, args):
    whole = metric_cls()
    whole.update(*args)
    first, second = metric_cls(), metric_cls()
    first.update(*(a[:2] for a in args))
    second.update(*(a[2:] for a in args))
    first.merge_state(second)
    # the same as summing the states by hand (what dist_reduce_fx="sum" does across processes)
    third = metric_cls()
    left, right = metric_cls(), metric_cls()
    left.update(*(a[:1] for a in args))
    right.update(*(a[1:] for a in args))
    for name in third._defaults:
        setattr(third, name, getattr(left, name) + getattr(right, name))
    for merged in (first, third):
        a, b = whole.compute(), merged.compute()
        if isinstance(a, dict):
            a, b = torch.stack(list(a.values())), torch.stack(list(b.values()))
        torch.testing.assert_close(a, b, equal_nan=True)
    assert all(whole._reductions[name] is not None for name in whole._defaults)


def test_forward_and_reset():
    metric = TokenAccuracy()
    batch_value = metric([[ps([1, 2], [1, 0])]])
    assert batch_value.item() == pytest.approx(0.5)
    metric([[ps([1], [1])]])
    assert metric.compute().item() == pytest.approx(0.75)
    metric.reset()
    assert int(metric.n_records) == 0


# ----------------------------------------------------------------------------------- end to end


def test_metrics_from_scorer_outputs():
    """Scorer -> metrics on a fake model whose next token after word i is word i + 1."""
    words = ["<pad>", "</s>", "zero", "one", "two", "three", "four"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_word_level(words), eos_token="</s>", pad_token="<pad>"
    )

    class Next(nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
            return nn.functional.one_hot((input_ids + 1) % len(words), len(words)).float() * 5

    model = Next()
    scorer = Scorer(batch_size=2)
    pairs = [
        QAPair("zero", "one two"),  # both tokens predicted
        # after 'one' -> two (label three), after 'three' -> four (label two), after 'two' ->
        # three (label four): 0/3
        QAPair("zero one", "three two four"),
    ]
    scores = scorer.score(model, tok, pairs)
    assert [s.token_accuracy for s in scores] == [1.0, 0.0]
    metric = TokenAccuracy()
    metric.update([[scores[0]], [scores[1]]])
    assert metric.compute().item() == pytest.approx(0.5)
    answers = scorer.generate_answers(model, tok, [QAPair("zero", "one two", ("one",))])
    em = ExactMatch()
    em.update([answers])
    assert answers[0].continuations == ("one two", "one") and em.compute().item() == 1.0


def _word_level(words: list[str]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok
