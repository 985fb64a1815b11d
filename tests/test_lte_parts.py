"""LTE parts without a language model: templates, parallel data, edit memory and retrieval."""

import json
from dataclasses import replace

import pytest
import torch

from lit_edit.data import read_conversations
from lit_edit.data.lte_parallel import (
    ParallelDataBuilder,
    nearest_other_facts,
    sample_stats,
    write_fastchat,
)
from lit_edit.nn.lte_templates import (
    LTE_QUERY_TEMPLATE,
    LTE_TEMPLATE,
    ChatWrapper,
    edit_prompt,
    format_facts,
)
from lit_edit.nn.retrieval import EditMemory, HashingEncoder, Retriever, load_encoder
from lit_edit.records import EditRecord, QAPair

PAPER_TRAIN = (
    "Please acknowledge the updated information provided below and respond to the subsequent "
    "question.\n\n[Updated Information]:\n{facts}\n\n[Question]:\n{question}"
)
PAPER_QUERY = (
    "Please acknowledge the updated information provided below and respond to the subsequent "
    "query.\n\n[Updated Information]:\n{facts}\n\n[Query]:\n{question}"
)


def test_template_strings_are_the_papers():
    assert LTE_TEMPLATE == PAPER_TRAIN
    assert LTE_QUERY_TEMPLATE == PAPER_QUERY


def test_facts_are_numbered_true_first_only_when_several():
    assert format_facts(["A is B"]) == "A is B"
    assert format_facts(["A is B", "C is D", "E is F"]) == "1. A is B\n2. C is D\n3. E is F"
    assert edit_prompt(["A is B", "C is D"], "What is A?") == (
        "Please acknowledge the updated information provided below and respond to the subsequent "
        "question.\n\n[Updated Information]:\n1. A is B\n2. C is D\n\n[Question]:\nWhat is A?"
    )
    with pytest.raises(ValueError):
        format_facts([])


class _ChatTokenizer:
    chat_template = "x"
    bos_token = "<s>"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "<s>[INST] " + messages[-1]["content"] + " [/INST]"


def test_chat_wrapper_uses_the_tokenizers_template_without_bos():
    wrap = ChatWrapper(_ChatTokenizer())
    assert wrap("Hi?") == "[INST] Hi? [/INST]"
    assert ChatWrapper(_ChatTokenizer(), use_chat_template=False)("Hi?") == "Hi?"

    class Plain:
        chat_template = None

    assert ChatWrapper(Plain())("Hi?") == "Hi?"
    with pytest.raises(ValueError, match="no chat template"):
        ChatWrapper(Plain(), use_chat_template=True)


def _records(n_subjects=12):
    out = []
    for s in range(n_subjects):
        for rel, obj in (("was born in", "Town"), ("works for", "Corp")):
            out.append(
                EditRecord(
                    prompt=f"Person{s} {rel}",
                    target_new=f"{obj}{s + 1}",
                    ground_truth=(f"{obj}{s}",),
                    subject=f"Person{s}",
                    rephrase_prompts=(f"Q: {rel} Person{s}?",),
                    portability={"two_hop": (QAPair(f"Country of Person{s} {rel}", f"Land{s}"),)},
                    locality={"neighborhood": (QAPair(f"Other{s} lives in", f"City{s}"),)},
                    index=len(out),
                )
            )
    return out


def test_builder_makes_in_scope_out_of_scope_and_unedited_twins():
    records = _records()
    samples = ParallelDataBuilder(HashingEncoder(), seed=0).build(records)
    first = [s for s in samples if s.record == 0]
    edited = [s for s in first if s.with_facts]
    # in-scope: edit, rephrase, portability; out-of-scope: the locality question
    assert sorted(s.kind for s in edited) == [
        "edit", "locality/neighborhood", "portability/two_hop", "rephrase",
    ]
    for s in edited:
        assert s.facts[0] == records[0].fact  # true fact first
        assert s.human == edit_prompt(s.facts, s.question)
        want = {"edit": "Town1", "rephrase": "Town1", "portability/two_hop": "Land0"}
        assert s.answer == want.get(s.kind, "City0")
        assert s.scope == ("out" if s.kind.startswith("locality") else "in")
    twins = {s.kind: s for s in first if not s.with_facts}
    # bare questions: ground truth for edit/rephrase, the locality answer, no portability twin
    assert twins["edit"].human == "Person0 was born in" and twins["edit"].answer == "Town0"
    assert twins["rephrase"].answer == "Town0"
    assert twins["locality/neighborhood"].answer == "City0"
    assert "portability/two_hop" not in twins
    stats = sample_stats(samples)
    assert stats["in/edited"] == 3 * len(records) and stats["out/edited"] == len(records)


def test_out_of_scope_questions_come_only_from_the_named_locality_groups():
    records = [
        replace(r, locality={**r.locality, "other_relation": (
            QAPair(f"{r.subject} speaks", "Lang0"), QAPair(f"{r.subject} owns", "Dog0"),
        )})
        for r in _records(4)
    ]
    every = ParallelDataBuilder(HashingEncoder()).build(records)
    kinds = sorted({s.kind for s in every if s.scope == "out"})
    assert kinds == ["locality/neighborhood", "locality/other_relation"]
    only = ParallelDataBuilder(HashingEncoder(), out_of_scope_groups=["other_relation"])
    out = [s for s in only.build(records) if s.scope == "out"]
    # two edited samples and two unedited twins per record, all from other_relation
    assert len(out) == 4 * len(records)
    assert {s.kind for s in out} == {"locality/other_relation"}
    assert {s.answer for s in out} == {"Lang0", "Dog0"}
    capped = ParallelDataBuilder(
        HashingEncoder(), out_of_scope_groups=["other_relation"], max_out_of_scope=1
    ).build(records)
    assert sum(s.scope == "out" and s.with_facts for s in capped) == len(records)


def test_builder_portability_twins_come_from_the_unedited_answerer():
    records = _records(3)
    asked = []

    def answer(questions):
        asked.extend(questions)
        return ["Before" for _ in questions]

    samples = ParallelDataBuilder(HashingEncoder(), unedited_answers=answer).build(records)
    twins = [s for s in samples if s.kind.startswith("portability") and not s.with_facts]
    assert len(twins) == len(records) and all(s.answer == "Before" for s in twins)
    assert asked == [r.portability["two_hop"][0].prompt for r in records]


def test_distractors_are_seeded_near_and_never_the_same_subject():
    records = _records()
    builder = ParallelDataBuilder(HashingEncoder(), seed=3)
    a, b = builder.build(records), ParallelDataBuilder(HashingEncoder(), seed=3).build(records)
    assert a == b
    assert a != ParallelDataBuilder(HashingEncoder(), seed=4).build(records)
    pools = nearest_other_facts(records, HashingEncoder(), n_neighbours=5)
    facts = {r.fact: r for r in records}
    for s in a:
        if not s.with_facts:
            continue
        owner = records[s.record]
        assert len(set(s.facts)) == len(s.facts)
        for distractor in s.facts[1:]:
            other = facts[distractor]
            assert other.subject != owner.subject
            assert records.index(other) in pools[s.record]
    counts = sample_stats(a)
    n = counts["facts=1"] + counts["facts=2"] + counts["facts=3"]
    assert 0.4 < counts["facts=1"] / n < 0.6  # 50 / 25 / 25
    assert 0.15 < counts["facts=3"] / n < 0.35


def test_true_fact_at_a_random_place_keeps_the_same_lists():
    records = _records()
    first = ParallelDataBuilder(HashingEncoder(), seed=3).build(records)
    anywhere = ParallelDataBuilder(HashingEncoder(), seed=3, true_fact_first=False).build(records)
    def key(x):
        return (x.record, x.question, x.answer, x.scope, x.kind, x.with_facts)

    assert sorted(map(key, first)) == sorted(map(key, anywhere))  # same samples, other lists
    places = []
    for b in anywhere:
        if not b.with_facts:
            continue
        own = records[b.record].fact
        assert own in b.facts and len(b.facts) == len(set(b.facts))
        assert b.human == edit_prompt(b.facts, b.question)
        if len(b.facts) > 1:
            places.append(b.facts.index(own))
    assert all(a.facts[0] == records[a.record].fact for a in first if a.with_facts)
    # 2 and 3 facts: the own fact lands at every place, first about as often as by chance
    assert set(places) == {0, 1, 2}
    assert 0.3 < places.count(0) / len(places) < 0.6


def test_builder_output_round_trips_through_the_fastchat_reader(tmp_path):
    samples = ParallelDataBuilder(None, seed=0).build(_records(2))
    path = tmp_path / "lte.json"
    write_fastchat(samples, path)
    raw = json.loads(path.read_text())
    assert raw[0]["id"] == "identity_0_lit_edit"
    assert [t["from"] for t in raw[0]["conversations"]] == ["human", "gpt"]
    pairs = read_conversations(path).records
    assert [(p.prompt, p.answer) for p in pairs] == [(s.human, s.answer) for s in samples]


@pytest.mark.parametrize("key_dtype", ["float16", "int8"])
def test_memory_save_load_round_trip(key_dtype):
    memory = EditMemory(key_dtype)
    keys = torch.randn(5, 16)
    memory.add(keys, [f"q{i}" for i in range(5)], [f"fact {i}" for i in range(5)])
    state = memory.state_dict()
    loaded = EditMemory(key_dtype)
    loaded.load_state_dict(state)
    assert len(loaded) == 5 and loaded.facts == memory.facts
    assert loaded.questions == memory.questions
    assert torch.equal(loaded.keys, memory.keys)
    q = torch.randn(3, 16)
    for x, y in zip(memory.search(q, 2), loaded.search(q, 2), strict=True):
        assert torch.equal(x, y)
    # through torch.save as in a checkpoint
    buffer = __import__("io").BytesIO()
    torch.save({"state_dict": state}, buffer)
    buffer.seek(0)
    again = EditMemory(key_dtype)
    again.load_state_dict(torch.load(buffer, weights_only=False)["state_dict"])
    assert again.facts == memory.facts and torch.equal(again.keys, memory.keys)


@pytest.mark.parametrize(("key_dtype", "atol"), [("float16", 2e-3), ("int8", 4e-3)])
def test_memory_search_is_exact_cosine_top_k_and_truncates(key_dtype, atol):
    torch.manual_seed(0)
    keys = torch.randn(300, 32)
    memory = EditMemory(key_dtype)
    for i in range(0, 300, 100):  # inserted in chunks: growth keeps the content
        memory.add(keys[i : i + 100], ["q"] * 100, [str(j) for j in range(i, i + 100)])
    queries = torch.randn(4, 32)
    scores, idx = memory.search(queries, 3)
    exact = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(
        keys, dim=-1
    ).T
    assert torch.equal(idx, exact.topk(3).indices)
    assert torch.allclose(scores, exact.topk(3).values, atol=atol)
    unit = torch.nn.functional.normalize(keys, dim=-1)
    assert torch.allclose(memory.keys.float(), unit, atol=atol)  # stored keys, rounded
    assert torch.equal(memory.rows(idx), memory.keys[idx].float())  # [4, 3, D]
    single_scores, single_idx = memory.search(queries[:1], 3)
    assert torch.equal(single_idx, idx[:1])
    memory.truncate(10)
    assert len(memory) == 10 and memory.search(queries, 50)[1].shape == (4, 10)
    with pytest.raises(ValueError):
        memory.add(torch.randn(1, 8), ["q"], ["f"])


def test_retrieval_returns_the_inserted_fact_for_its_own_question():
    retriever = Retriever(HashingEncoder(), top_k=2)
    questions = [f"Where was Person{i} born?" for i in range(50)]
    facts = [f"Where was Person{i} born? Town{i}" for i in range(50)]
    assert retriever.insert(questions[:10], facts[:10]) == 0
    for q, f in zip(questions[10:], facts[10:], strict=True):  # one by one
        retriever.insert([q], [f])
    found = retriever.retrieve(questions)
    assert [hits[0].fact for hits in found] == facts
    assert all(len(hits) == 2 and hits[0].score >= hits[1].score for hits in found)
    strict = Retriever(HashingEncoder(), retriever.memory, threshold=0.999)
    assert strict.retrieve(["Something unrelated entirely"]) == [[]]


@pytest.mark.slow
def test_retrieval_with_the_offline_sentence_encoder():
    encoder = load_encoder("all-MiniLM-L6-v2")
    retriever = Retriever(encoder)
    retriever.insert(
        ["What is the capital of France?", "Who wrote Hamlet?", "Where was Ada Lovelace born?"],
        ["The capital of France is Lyon", "Hamlet was written by Marlowe", "Ada was born in Rome"],
    )
    assert encoder.dim == 384
    found = retriever.retrieve(["Which city is France's capital?", "Hamlet's author is"])
    assert [h[0].fact for h in found] == [
        "The capital of France is Lyon",
        "Hamlet was written by Marlowe",
    ]


def test_set_dropout_changes_every_dropout_and_the_config():
    from transformers import GPT2Config, GPT2LMHeadModel

    from lit_edit.nn.lte_positions import set_dropout

    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    n = set_dropout(model, 0.25)
    probs = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert n == len(probs) > 0 and set(probs) == {0.25}
    assert (config.attn_pdrop, config.resid_pdrop, config.embd_pdrop) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="dropout must be in"):
        set_dropout(model, 1.0)
    with pytest.raises(ValueError, match="no dropout modules"):
        set_dropout(torch.nn.Linear(2, 2), 0.1)


@pytest.mark.parametrize("key_dtype", ["float32", "int8"])
def test_memory_squared_norms_follow_insertions_truncation_and_reload(key_dtype):
    memory = EditMemory(key_dtype, rerank=0, normalise=False)
    memory.add(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), ["a", "b"], ["fa", "fb"])
    memory.truncate(1)
    memory.add(torch.tensor([[0.0, 2.0]]), ["c"], ["fc"])
    # |(3, 4)|^2 = 25, |(0, 2)|^2 = 4; int8 stores 3 as round(3 * 127 / 4) = 95 steps of 4/127
    first = 25.0 if key_dtype == "float32" else (95 * 4 / 127) ** 2 + 16.0
    assert memory.sq_norms.tolist() == pytest.approx([first, 4.0], rel=1e-6)
    assert torch.allclose(memory.sq_norms, memory.keys.pow(2).sum(-1))
    again = EditMemory(key_dtype, rerank=0, normalise=False)
    again.load_state_dict(memory.state_dict())
    assert torch.equal(again.sq_norms, memory.sq_norms)
