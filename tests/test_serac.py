"""SERAC: routing to the base or the counterfactual model, restore, checkpoints, the losses."""

from __future__ import annotations

import math

import pytest
import torch

from lit_edit.methods import SERACEditor
from lit_edit.nn.serac import balanced_bce, log_one_minus_exp, pooling_of, resolve_encoder_path
from lit_edit.records import EditRecord, QAPair
from lit_edit.world import load_world, resolve_tinyfacts


@pytest.fixture(scope="module")
def records() -> list[EditRecord]:
    return load_world(resolve_tinyfacts("tinyfacts")).edit_records(6, seed=5)


@pytest.fixture(scope="module")
def editor() -> SERACEditor:
    torch.manual_seed(0)
    return SERACEditor().eval()


def base_scores(editor: SERACEditor, pairs: list[QAPair]):
    return editor.evaluation.scorer().score(editor.model, editor.tokenizer, pairs)


def all_pairs(records: list[EditRecord]) -> list[QAPair]:
    return [p for r in records for p in (r.edit_pair, *r.rephrase_pairs,
                                         *(q for g in r.locality.values() for q in g))]


def test_empty_memory_gives_exactly_the_base_scores(editor, records) -> None:
    pairs = all_pairs(records)
    assert len(editor.memory) == 0
    ours, base = editor.score_pairs(pairs), base_scores(editor, pairs)
    for a, b in zip(ours, base, strict=True):
        assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.pred_ids, b.pred_ids)
    assert editor.record_values(records) == [{} for _ in records]


def test_unrouted_queries_score_bit_identically_to_the_base(editor, records) -> None:
    pairs = all_pairs(records[1:])
    editor.threshold, editor.log_threshold = 0.99, math.log(0.99)  # only near-identical texts
    try:
        with editor.edit(records[:1]):
            queries = [records[0].edit_pair, *pairs]
            routes, _ = editor.route([p.prompt for p in queries])
            assert routes[0] == 0  # the edit prompt itself goes to its edit
            unrouted = [i for i, r in enumerate(routes) if r < 0]
            assert len(unrouted) == len(pairs)
            ours = editor.score_pairs(queries)
            base = base_scores(editor, pairs)
            for i, b in zip(unrouted, base, strict=True):
                assert torch.equal(ours[i].logprobs, b.logprobs)
            # the routed one is the counterfactual model's answer given the fact
            fact = f"{records[0].fact} {records[0].prompt}"
            cf = editor.evaluation.scorer().score(
                editor.counterfactual, editor.tokenizer, [QAPair(fact, records[0].target_new)]
            )[0]
            assert torch.equal(ours[0].logprobs, cf.logprobs)
    finally:
        editor.threshold, editor.log_threshold = 0.5, math.log(0.5)


def test_restore_leaves_the_memory_as_it_was(editor, records) -> None:
    empty = editor.memory.get_extra_state()
    first = editor.edit(records[:2])
    after_first = editor.memory.get_extra_state()
    second = editor.edit(records[2:3])
    assert len(editor.memory) == 3 and editor.memory.facts[2] == records[2].fact
    assert editor.memory.questions[2] == records[2].prompt  # the key text: prompt, no target
    second.restore()
    state = editor.memory.get_extra_state()
    assert state["facts"] == after_first["facts"]
    assert torch.equal(state["keys"], after_first["keys"])
    first.restore()
    assert len(editor.memory) == 0 and editor.memory.get_extra_state()["facts"] == empty["facts"]


def test_checkpoint_round_trip_reproduces_routing_and_scores(records) -> None:
    first = SERACEditor().train()
    optimizer = first.configure_optimizers()
    first.supervised_loss(records[:3])["loss"].backward()  # move off the pretrained weights
    optimizer.step()
    first.forget_embeddings()
    first.eval()
    checkpoint = {"state_dict": first.state_dict()}
    first.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("model.") for k in checkpoint["state_dict"])
    assert any(k.startswith("counterfactual.") for k in checkpoint["state_dict"])
    assert any(k.startswith("classifier.") for k in checkpoint["state_dict"])
    second = SERACEditor().eval()
    second.on_load_checkpoint(checkpoint)
    second.load_state_dict(checkpoint["state_dict"])
    pairs = all_pairs(records[3:])
    results = []
    for editor in (first, second):
        with editor.edit(records[3:5]):
            results.append((editor.route([p.prompt for p in pairs]),
                            editor.score_pairs(pairs), editor.record_values(records[3:5])))
    (r1, v1), (r2, v2) = results[0][0], results[1][0]
    assert r1 == r2 and torch.equal(v1, v2)
    assert any(r >= 0 for r in r1) and any(r < 0 for r in r1)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a.logprobs, b.logprobs)
    assert results[0][2] == results[1][2]


def toy_records() -> list[EditRecord]:
    return [
        EditRecord("Ann lives in", "Paris", rephrase_prompts=("Ann resides in",),
                   locality={"n": (QAPair("Bob lives in", "Rome"),)}),
        EditRecord("Cid works for", "Acme", rephrase_prompts=("The employer of Cid is",),
                   locality={"n": (QAPair("Dan works for", "Initech"),)}),
    ]


@pytest.mark.parametrize("extensions", [False, True], ids=["paper", "balanced+cf-locality"])
def test_supervised_loss_equals_a_hand_computed_value(editor, extensions) -> None:
    recs = toy_records()
    # queries: 4 in scope (edit, rephrase of each record; gold 0, 0, 1, 1), then 2 locality
    log_s = torch.tensor([[-0.1, -2.0], [-0.3, -1.5], [-2.5, -0.2], [-1.0, -0.4],
                          [-0.7, -3.0], [-2.0, -0.9]])
    seen = {}

    def fake(keys, queries):
        seen["args"] = (keys, queries)
        return log_s

    editor.classifier.log_similarity = fake
    editor.balance_negatives = editor.counterfactual_locality = extensions
    try:
        out = editor.supervised_loss(recs)
    finally:
        del editor.classifier.log_similarity
        editor.balance_negatives = editor.counterfactual_locality = False
    assert seen["args"] == (["Ann lives in", "Cid works for"],
                            ["Ann lives in", "Ann resides in", "Cid works for",
                             "The employer of Cid is", "Bob lives in", "Dan works for"])
    pos = [-0.1, -0.3, -0.2, -0.4]
    in_batch = [-2.0, -1.5, -2.5, -1.0]  # in-scope queries against the other record's edit
    loc = [-0.7, -0.9]  # each locality query against its own record's edit

    def nlog1m(xs):
        return [-math.log(1 - math.exp(x)) for x in xs]

    if extensions:
        l_cls = -sum(pos) / 4 + sum(nlog1m(loc)) / 2 + sum(nlog1m(in_batch)) / 4
    else:
        l_cls = -sum(pos) / 4 + sum(nlog1m(in_batch + loc)) / 6
    cf_pairs = [QAPair(f"{r.fact} {q}", r.target_new) for r in recs
                for q in (r.prompt, *r.rephrase_prompts)]
    if extensions:
        cf_pairs += [QAPair(f"{r.fact} {p.prompt}", p.answer) for r in recs
                     for p in r.locality["n"]]
    scores = editor.evaluation.scorer().score(editor.counterfactual, editor.tokenizer, cf_pairs)
    lp = torch.cat([s.logprobs for s in scores])
    l_cntr = float(-lp.mean())
    assert float(out["loss_cls"]) == pytest.approx(l_cls, rel=1e-6)
    assert float(out["loss_cntr"].detach()) == pytest.approx(l_cntr, rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(0.1 * l_cntr + 1.0 * l_cls, rel=1e-5)


def test_soft_loss_with_nothing_in_scope_is_the_base_nll(editor) -> None:
    recs = toy_records()
    editor.classifier.log_similarity = lambda keys, queries: torch.full((len(queries), 2), -50.0)
    try:
        out = editor.soft_loss(recs)
    finally:
        del editor.classifier.log_similarity
    scores = base_scores(editor, [r.edit_pair for r in recs])
    nll = float(-torch.cat([s.logprobs for s in scores]).mean())
    assert float(out["loss_loc"]) == pytest.approx(0.0, abs=1e-5)  # the mixture is the base
    assert float(out["loss_edit"]) == pytest.approx(nll, rel=1e-4)


def test_balanced_bce_and_its_stable_log() -> None:
    x = torch.tensor([-1e-3, -0.5, -5.0, -40.0])
    assert torch.allclose(log_one_minus_exp(x), torch.log(1 - torch.exp(x.double())).float())
    loss = balanced_bce(torch.tensor([-0.2, -0.4]), torch.tensor([-1.0]))
    assert float(loss) == pytest.approx(0.3 - math.log(1 - math.exp(-1.0)))


def test_a_counterfactual_model_with_another_vocabulary_is_refused(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(tmp_path)
    GPT2LMHeadModel(GPT2Config(vocab_size=3, n_layer=1, n_embd=8, n_head=2, bos_token_id=0,
                               eos_token_id=0, pad_token_id=0)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"counterfactual: '{tmp_path}' does not share"):
        SERACEditor(counterfactual=str(tmp_path))


def test_pooling_comes_from_the_model_config(tmp_path) -> None:
    assert pooling_of(resolve_encoder_path("all-MiniLM-L6-v2")) == ("mean", True)
    (tmp_path / "config.json").write_text("{}")  # a plain encoder: first token, unnormalised
    assert pooling_of(str(tmp_path)) == ("cls", False)
