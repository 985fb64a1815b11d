"""The learned scope of the LTE edit memory: pairs, head, retrieval with it, the editor's fit."""

import math

import pytest
import torch

from lit_edit.nn.retrieval import HashingEncoder, Retriever
from lit_edit.nn.scope import ScopeHead, ScopePair, in_scope_questions, scope_pairs
from lit_edit.records import EditRecord, QAPair


def _record(name: str, alias: str) -> EditRecord:
    return EditRecord(
        prompt=f"{name} was born in",
        target_new="Town2",
        ground_truth=("Town1",),
        subject=name,
        rephrase_prompts=(f"Where was {name} born?",),
        portability={
            "two_hop": (QAPair(f"The country where {name} was born is", "Land2"),),
            "subject_aliasing": (QAPair(f"{alias} was born in", "Town2"),),
        },
        locality={
            "neighborhood": (QAPair("Zed Quo was born in", "Town1"),),
            "other_relation": (QAPair(f"{name} lives in", "City"),),
        },
    )


def test_scope_pairs_keep_questions_naming_the_subject_and_draw_seeded_negatives():
    records = [_record("Ann Lee", "Nana"), _record("Bob Ray", "Bobo"), _record("Cy Oz", "Cee")]
    assert in_scope_questions(records[0]) == [
        "Ann Lee was born in", "Where was Ann Lee born?", "The country where Ann Lee was born is",
    ]  # the alias question names nothing of the edit: left out
    pairs = scope_pairs(records, seed=3)
    first = [p for p in pairs if p.edit == "Ann Lee was born in"]
    assert first[:5] == [
        ScopePair("Ann Lee was born in", "Ann Lee was born in", True),
        ScopePair("Ann Lee was born in", "Where was Ann Lee born?", True),
        ScopePair("Ann Lee was born in", "The country where Ann Lee was born is", True),
        ScopePair("Ann Lee was born in", "Zed Quo was born in", False),
        ScopePair("Ann Lee was born in", "Ann Lee lives in", False),
    ]
    negative = first[5]  # another record's in-scope question
    assert len(first) == 6 and not negative.in_scope and "Ann Lee" not in negative.query
    assert negative.query in in_scope_questions(records[1]) + in_scope_questions(records[2])
    assert scope_pairs(records, seed=3) == pairs
    assert len(pairs) == 18 and sum(p.in_scope for p in pairs) == 9
    assert not any(p.in_scope for p in scope_pairs(records, random_negatives=0)[3::5])
    # without a subject every portability question is in scope
    bare = EditRecord("Q?", "A", portability={"x": (QAPair("Other Q?", "A"),)})
    assert in_scope_questions(bare) == ["Q?", "Other Q?"]


def test_neighbours_add_all_their_in_scope_questions_as_negatives_and_all_positives_option():
    records = [_record("Ann Lee", "Nana"), _record("Bob Ray", "Bobo"), _record("Cy Oz", "Cee")]
    assert in_scope_questions(records[0], named_only=False)[-1] == "Nana was born in"
    pairs = scope_pairs(records, random_negatives=0, named_only=False, neighbours=[[2], [], []])
    first = [p for p in pairs if p.edit == records[0].prompt]
    assert [p.query for p in first if p.in_scope] == in_scope_questions(records[0], False)
    hard = [p.query for p in first if not p.in_scope][2:]  # after the two locality questions
    assert hard == in_scope_questions(records[2], False)  # Cy Oz's, his alias question included
    assert len(pairs) == 3 * (4 + 2) + 4
    with pytest.raises(ValueError, match="among its own neighbours"):
        scope_pairs(records, neighbours=[[0], [], []])


def test_features_by_hand():
    e, q = torch.tensor([2.0, 0.0]), torch.tensor([0.6, 0.8])
    assert torch.allclose(ScopeHead.features(e, q), torch.tensor([0.6, 0.0, 0.4, 0.8, 0.6]))
    batch = ScopeHead.features(torch.stack([e, e]), torch.stack([q, e]))  # [2, 5]
    assert torch.allclose(batch[1], torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]))


def _synthetic(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs in scope when the query is a noisy copy of the edit, else another random vector."""
    gen = torch.Generator().manual_seed(seed)
    edits = torch.randn(n, dim, generator=gen)
    labels = torch.arange(n) % 2 == 0
    others = torch.randn(n, dim, generator=gen)
    noisy = edits + 0.3 * torch.randn(n, dim, generator=gen)
    queries = torch.where(labels[:, None], noisy, others)
    return edits, queries, labels


def test_head_fit_learns_is_seeded_and_leaves_the_global_rng_alone():
    edits, queries, labels = _synthetic(512, 16, seed=0)
    head = ScopeHead(hidden=32)
    with pytest.raises(RuntimeError, match="not trained"):
        head(edits, queries)
    rng_before = torch.get_rng_state()
    loss = head.fit(edits, queries, labels, steps=300, seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert loss < 0.1 and head.trained
    assert not any(w.requires_grad for w in head.weights.values())
    test_e, test_q, test_y = _synthetic(400, 16, seed=9)
    accuracy = ((head(test_e, test_q) >= 0.5) == test_y).float().mean()
    assert accuracy > 0.95
    again = ScopeHead(hidden=32)
    again.fit(edits, queries, labels, steps=300, seed=1)
    assert all(torch.equal(again.weights[k], w) for k, w in head.weights.items())
    with pytest.raises(ValueError, match="trained on 33 pair features, these inputs give 17"):
        head(torch.ones(8), torch.ones(8))
    with pytest.raises(ValueError, match="no scope pairs"):
        ScopeHead().fit(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool))


def test_a_second_view_adds_its_features_and_is_required_once_trained():
    e, q = torch.tensor([2.0, 0.0]), torch.tensor([0.6, 0.8])
    both = ScopeHead.features(e, q, (torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])))
    assert torch.allclose(both[:5], ScopeHead.features(e, q))
    assert torch.allclose(both[5:], torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]))
    # labels only the second view can tell: the first view is the same for every pair
    gen = torch.Generator().manual_seed(0)
    n = 256
    states = torch.randn(n, 8, generator=gen)
    labels = torch.arange(n) % 2 == 0
    other = torch.randn(n, 8, generator=gen)
    query_states = torch.where(labels[:, None], states + 0.2 * other, other)
    same = torch.ones(n, 4)
    head = ScopeHead(hidden=16)
    head.fit(same, same, labels, states=(states, query_states), steps=300)
    assert ((head(same, same, (states, query_states)) >= 0.5) == labels).float().mean() > 0.95
    with pytest.raises(ValueError, match="no state"):
        head(same, same)


def test_head_round_trips_through_the_state_dict():
    edits, queries, labels = _synthetic(64, 8, seed=0)
    head = ScopeHead(hidden=4)
    head.fit(edits, queries, labels, steps=20)
    state = head.state_dict()
    restored = ScopeHead()
    restored.load_state_dict(state)
    assert restored.hidden == 4 and torch.equal(restored(edits, queries), head(edits, queries))
    untrained = ScopeHead()
    fresh = ScopeHead()
    fresh.load_state_dict(untrained.state_dict())
    assert not fresh.trained


def _cosine_head(dim: int, at: float) -> ScopeHead:
    """A hand-set head: in-scope probability >= 0.5 exactly when the cosine is >= ``at``."""
    head = ScopeHead(hidden=1)
    w1 = torch.zeros(1, 2 * dim + 1)
    w1[0, -1] = 10.0  # the cosine feature
    gelu_at = 10 * at * 0.5 * (1 + math.erf(10 * at / math.sqrt(2)))
    head.weights = {"w1": w1, "b1": torch.zeros(1), "w2": torch.ones(1, 1),
                    "b2": torch.tensor([-gelu_at])}
    return head


def test_retrieval_keeps_only_the_edits_the_head_puts_in_scope():
    encoder = HashingEncoder(dim=64)
    questions = ["Where was Ann Lee born?", "Who employs Bob Ray?", "Where does Cy Oz live?"]
    facts = [q + " X" for q in questions]
    retriever = Retriever(encoder, top_k=2, scope=_cosine_head(64, 0.9), candidates=3)
    retriever.insert(questions, facts)
    found = retriever.retrieve([*questions, "Something unrelated entirely"])
    assert [[r.fact for r in hits] for hits in found] == [[f] for f in facts] + [[]]
    assert all(hits[0].in_scope > 0.5 and math.isclose(hits[0].score, 1.0, abs_tol=1e-3)
               for hits in found[:3])
    # every candidate in scope: ordered by probability, at most top_k
    loose = Retriever(encoder, retriever.memory, top_k=2, scope=_cosine_head(64, -0.05),
                      candidates=3)
    hits = loose.retrieve([questions[1]])[0]
    assert len(hits) == 2 and hits[0].fact == facts[1] and hits[0].in_scope >= hits[1].in_scope
    # the cosine threshold still applies with a head
    both = Retriever(encoder, retriever.memory, threshold=0.999, scope=_cosine_head(64, -0.05))
    assert [len(h) for h in both.retrieve([questions[0], "Who employs Ann?"])] == [1, 0]
    with pytest.raises(ValueError, match="scope_threshold"):
        Retriever(encoder, scope=ScopeHead(), scope_threshold=1.5)


def test_states_bring_in_candidates_the_sentence_encoder_misses():
    encoder = HashingEncoder(dim=64)
    questions = ["Where was Ann Lee born?", "Where was Bob Ray born?"]
    # the "model" knows that Bob Rayna (lexically nearer Bob Ray) is Ann Lee: the same state
    alias = "Where was Bob Rayna born?"
    known = {questions[0]: 0, alias: 0, questions[1]: 1}
    calls = []

    def states(texts):
        calls.append(list(texts))
        return torch.eye(4)[[known.get(t, 2 + len(t) % 2) for t in texts]]

    head = ScopeHead(hidden=1)  # in scope when the states' cosine is >= 0.9
    n_in = 2 * 64 + 1 + 2 * 4 + 1
    w1 = torch.zeros(1, n_in)
    w1[0, -1] = 10.0
    gelu_at = 9.0 * 0.5 * (1 + math.erf(9.0 / math.sqrt(2)))
    head.weights = {"w1": w1, "b1": torch.zeros(1), "w2": torch.ones(1, 1),
                    "b2": torch.tensor([-gelu_at])}
    retriever = Retriever(encoder, top_k=1, scope=head, candidates=1, states=states)
    retriever.insert(questions, [q + " X" for q in questions])
    found = retriever.retrieve([alias, questions[1], "Who is Zed?"])
    assert [[r.fact for r in hits] for hits in found] == [
        ["Where was Ann Lee born? X"], ["Where was Bob Ray born? X"], []
    ]
    assert calls[1] == questions  # the memory's questions, once; then kept
    retriever.retrieve([alias])
    assert questions not in calls[2:]
    retriever.memory.truncate(1)  # a change of the memory is noticed
    assert retriever.retrieve(["Where was Bob Ray born?"]) == [[]]
