"""Tests of TinyFacts: world generation, edit records, tokenizer, pretraining and the cache."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lit_edit.records import EditRecord  # noqa: E402
from lit_edit.sampling import LengthBucketSampler  # noqa: E402
from lit_edit.tokenization import encode_pair  # noqa: E402
from lit_edit.world import (  # noqa: E402
    TinyLMConfig,
    World,
    WorldConfig,
    build_model,
    build_tiny_model,
    evaluate_world,
    load_metrics,
    load_world,
    probe_sets,
    relations,
    resolve_tinyfacts,
    token_accuracies,
    train_tokenizer,
)
from lit_edit.world import cache as cache_module  # noqa: E402
from lit_edit.world.__main__ import main as world_main  # noqa: E402

SMALL = WorldConfig(seed=3, n_people=24, n_cities=10, n_countries=4, n_companies=6,
                    n_languages=4)
TINY_LM = TinyLMConfig(n_layer=1, n_embd=64, n_head=4, vocab_size=400, max_epochs=15,
                       batch_size=32, lr=1e-2, warmup_ratio=0.05)


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(SMALL)


@pytest.fixture(scope="module")
def default_world() -> World:
    return World.generate(WorldConfig())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small model built once into a temporary cache: (cache dir, model dir)."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, build_tiny_model(SMALL, TINY_LM, cache_dir=cache)


# ------------------------------------------------------------------------------- the world
def test_default_world_size(default_world: World) -> None:
    assert 1900 <= len(default_world.facts) <= 2100
    assert len(default_world.relations) >= 6
    assert {r.subject_type for r in relations()} | {r.object_type for r in relations()} == {
        "person", "city", "country", "company", "language"}
    names = [n for kind in default_world.entities.values() for n in kind] + list(
        default_world.aliases)
    assert len(names) == len(set(names))


def test_held_out_phrasings_never_pretrained_with_their_fact(default_world: World) -> None:
    pairs = default_world.pretraining_pairs()
    prompts = {p.prompt for p in pairs}
    corpus = "\n".join(f"{p.prompt} {p.answer}" for p in pairs)
    n_checked = 0
    for fact in default_world.facts:
        assert fact.held_out_templates, "every fact has held-out phrasings by default"
        for pair in default_world.pairs(fact, "held_out"):
            assert pair.prompt not in prompts
            assert f"{pair.prompt} {pair.answer}" not in corpus
            n_checked += 1
        for pair in default_world.pairs(fact, "train"):
            assert pair.prompt in prompts
    assert n_checked == 2 * len(default_world.facts)


def test_every_template_is_pretrained_with_many_facts(default_world: World) -> None:
    for relation in default_world.relations.values():
        facts = default_world.facts_of[relation.name]
        for t in range(len(relation.templates)):
            n_seen = sum(t in f.train_templates for f in facts)
            assert n_seen >= 0.5 * len(facts), (relation.name, t, n_seen)
    two_hop_prompts = {p.prompt for t in default_world.two_hop if t.pretrained
                       for p in default_world.two_hop_pairs(t, "train")}
    for two in default_world.two_hop:
        for pair in default_world.two_hop_pairs(two, "held_out"):
            assert pair.prompt not in two_hop_prompts


def test_two_hop_answers_follow_from_the_facts(default_world: World) -> None:
    w = default_world
    assert len(w.two_hop) > 1000
    for two in w.two_hop:
        comp = w.compositions[two.composition]
        first = w.facts[two.first_fact]
        second = w.facts[two.second_fact]
        assert (first.relation, second.relation) == (comp.first, comp.second)
        assert first.subject == two.subject and first.object == two.bridge
        assert second.subject == two.bridge and second.object == two.object
        assert w.fact(comp.second, first.object_id) is second
    # the world is consistent: a country's capital lies in that country
    for country in w.facts_of["capital_of"]:
        assert w.fact("located_in", country.object_id).object == country.subject


def test_generation_is_seeded() -> None:
    a, b = World.generate(SMALL), World.generate(SMALL)
    assert a.pretraining_texts() == b.pretraining_texts()
    assert a.facts == b.facts and a.fingerprint() == b.fingerprint()
    c = World.generate(WorldConfig(**{**SMALL.to_dict(), "seed": SMALL.seed + 1}))
    assert c.pretraining_texts() != a.pretraining_texts()
    assert c.fingerprint() != a.fingerprint()


def test_world_json_round_trip(world: World, tmp_path: Path) -> None:
    again = World.from_json(world.to_json())
    assert again.config == world.config and again.facts == world.facts
    world.save(tmp_path / "world.json")
    assert World.load(tmp_path / "world.json").fingerprint() == world.fingerprint()
    data = json.loads(world.to_json())
    data["fingerprint"] = "0" * 16
    with pytest.raises(ValueError, match="generator changed"):
        World.from_dict(data)


def test_invalid_configs_are_rejected() -> None:
    with pytest.raises(ValueError, match="n_countries"):
        WorldConfig(n_cities=3, n_countries=5)
    with pytest.raises(ValueError, match="held_out_per_fact"):
        WorldConfig(held_out_per_fact=6)
    with pytest.raises(ValueError, match="unknown WorldConfig field"):
        WorldConfig.from_dict({"n_planets": 3})
    with pytest.raises(ValueError, match="arch"):
        TinyLMConfig(arch="bert")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- edit records
def test_edit_records_are_valid_and_typed(default_world: World) -> None:
    w = default_world
    records = w.edit_records(300, seed=1)
    assert len(records) == 300 and len({r.index for r in records}) == 300
    assert len({r.meta["relation"] for r in records}) == len(w.relations)
    for r in records:
        r.validate()
        fact = w.facts[r.index]
        relation = w.relations[fact.relation]
        objects = w.entities[relation.object_type]
        assert r.source == "tinyfacts" and r.subject == fact.subject and r.subject in r.prompt
        assert r.ground_truth == (fact.object,)
        assert r.target_new in objects and r.target_new != fact.object
        assert r.prompt in {p.prompt for p in w.pairs(fact, "train")}
        assert set(r.rephrase_prompts) == {p.prompt for p in w.pairs(fact, "held_out")}
        assert r.meta["relation"] == fact.relation
        for pair in r.locality["neighborhood"]:
            assert fact.subject not in pair.prompt
        for pair in r.locality.get("other_relation", ()):
            assert fact.subject in pair.prompt
        if relation.subject_type == "person":
            alias_pairs = r.portability["subject_aliasing"]
            assert len(alias_pairs) == w.config.alias_templates_per_fact
            for alias_pair in alias_pairs:
                assert w.aliases[fact.subject_id] in alias_pair.prompt
                assert fact.subject not in alias_pair.prompt
                assert alias_pair.answer == r.target_new
        else:
            assert "subject_aliasing" not in r.portability
        assert EditRecord.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_two_hop_portability_follows_the_new_fact(default_world: World) -> None:
    w = default_world
    n_checked = 0
    for r in w.edit_records(200, seed=2):
        fact = w.facts[r.index]
        new_id = r.meta["new_object_id"]
        expected = set()
        for comp in w.compositions.values():
            if comp.first == fact.relation:
                expected.add(w.fact(comp.second, new_id).object)
            elif comp.second == fact.relation and w.two_hop_via(comp.name, fact.index):
                expected.add(r.target_new)
        got = {p.answer for p in r.portability.get("two_hop", ())}
        assert got == expected
        n_checked += len(got)
        # the new fact changes the two-hop answer whenever another object allows it
        old = {w.fact(c.second, fact.object_id).object for c in w.compositions.values()
               if c.first == fact.relation}
        assert not (old & got)
    assert n_checked > 100


def test_edit_records_are_seeded(world: World) -> None:
    a = [r.to_dict() for r in world.edit_records(20, seed=5)]
    b = [r.to_dict() for r in world.edit_records(20, seed=5)]
    c = [r.to_dict() for r in world.edit_records(20, seed=6)]
    assert a == b and a != c
    first = world.edit_records(5, seed=5, relations=["born_in"])
    assert {r.meta["relation"] for r in first} == {"born_in"}
    with pytest.raises(ValueError, match="unknown relation"):
        world.edit_records(5, relations=["owns"])


# ------------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trip_and_pair_split(world: World) -> None:
    texts = world.pretraining_texts()
    tok = train_tokenizer(texts, vocab_size=400)
    assert {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} <= set(range(len(tok)))
    for text in texts[::7] + ["Zürich  café, 東京!  ", "  leading and trailing  "]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    for r in world.edit_records(10):
        enc = encode_pair(tok, r.prompt, r.target_new)
        assert enc.prompt_ids[0] == tok.bos_token_id
        assert tok.decode(enc.answer_ids) == " " + r.target_new
        assert tok.decode(enc.prompt_ids, skip_special_tokens=True) == r.prompt


# ------------------------------------------------------------------- pretraining and cache
def test_small_world_pretraining_learns(built: tuple[Path, Path], world: World) -> None:
    _, path = built
    metrics = load_metrics(path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "GPT2LMHeadModel"
    untrained = build_model(TINY_LM, tok)
    pairs = probe_sets(world)["train_templates"]
    before = sum(token_accuracies(untrained, tok, pairs)) / len(pairs)
    after = sum(token_accuracies(model, tok, pairs)) / len(pairs)
    assert after == pytest.approx(metrics["accuracy"]["train_templates"], abs=1e-6)
    assert before < 0.2
    assert after > before + 0.5
    assert load_world(path).fingerprint() == world.fingerprint()


def test_cache_hit_returns_the_same_model_without_training(
    built: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, path = built
    first = AutoModelForCausalLM.from_pretrained(path).state_dict()

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not rebuild")

    monkeypatch.setattr(cache_module, "_build_into", no_training)
    again = build_tiny_model(SMALL, TINY_LM, cache_dir=cache)
    assert again == path
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # another setting is another key (and would build)
    other = TinyLMConfig(**{**TINY_LM.to_dict(), "lr": 1e-3})
    assert cache_module.model_dir(SMALL, other, cache) != path
    # the thread count changes the trained weights, so it is part of the key
    threads = TinyLMConfig(**{**TINY_LM.to_dict(), "num_threads": 2})
    assert cache_module.model_dir(SMALL, threads, cache) != path


def test_concurrent_builds_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = cache_module._build_into

    def counting(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_build_into", counting)
    config = TinyLMConfig(**{**TINY_LM.to_dict(), "max_epochs": 1})
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        build_tiny_model(SMALL, config, cache_dir=tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert len(calls) == 1
    leftovers = [p.name for p in results[0].parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_builds_do_not_depend_on_the_callers_threads(tmp_path: Path) -> None:
    """Two builds, one called with 1 torch thread and one with 2, give identical weights."""
    config = TinyLMConfig(**{**TINY_LM.to_dict(), "max_epochs": 2})
    assert config.num_threads == 1  # a fixed default, not the machine's load
    before = torch.get_num_threads()
    dirs = []
    try:
        for name, outer in (("a", 1), ("b", 2)):
            torch.set_num_threads(outer)
            dirs.append(build_tiny_model(SMALL, config, cache_dir=tmp_path / name))
            assert torch.get_num_threads() == outer  # the caller's setting is given back
    finally:
        torch.set_num_threads(before)
    a, b = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in dirs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [load_metrics(d) for d in dirs]
    assert metrics[0]["accuracy"] == metrics[1]["accuracy"]
    assert metrics[0]["num_threads"] == 1


def test_build_records_versions_and_warns_once_on_a_mismatch(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    import shutil
    import warnings

    from lit_edit.world import TinyFactsVersionWarning, check_versions, library_versions

    _, path = built
    recorded = load_metrics(path)["versions"]
    assert recorded == library_versions()
    assert {"torch", "transformers", "tokenizers"} <= set(recorded)
    assert check_versions(path) == {}
    copy = tmp_path / "old"
    shutil.copytree(path, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["versions"]["transformers"] = "0.0.1"
    (copy / "metrics.json").write_text(json.dumps(metrics))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            differ = check_versions(copy)
    assert differ == {"transformers": ("0.0.1", recorded["transformers"])}
    found = [w for w in caught if issubclass(w.category, TinyFactsVersionWarning)]
    assert len(found) == 1 and "transformers 0.0.1" in str(found[0].message)


def test_seeded_names() -> None:
    from lit_edit.world import named_configs

    world, model = named_configs("tinyfacts-seed2")
    assert world.seed == 2 and model.seed == 2 and model.arch == "gpt2"
    assert named_configs("tinyfacts") == (WorldConfig(), TinyLMConfig())
    assert named_configs("tinyfacts-seed0") == named_configs("tinyfacts")
    world, model = named_configs("tinyfacts-llama-seed1")
    assert world.seed == 1 and model.arch == "llama"
    with pytest.raises(ValueError, match="-seed<N>"):
        named_configs("tinyfacts-seedx")


def test_llama_variant_builds(world: World) -> None:
    tok = train_tokenizer(world.pretraining_texts(), 400)
    config = TinyLMConfig(**{**TINY_LM.to_dict(), "arch": "llama", "max_epochs": 1})
    model = build_model(config, tok)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert isinstance(model.model.layers[0].mlp.gate_proj, torch.nn.Linear)
    scores = evaluate_world(model, tok, world, max_pairs=20)
    assert 0.0 <= scores["train_templates"] <= 1.0


def test_command_line_loads_from_cache(built: tuple[Path, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    cache, path = built
    args = ["build", "--cache-dir", str(cache)]
    for key, value in SMALL.to_dict().items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    for key, value in TINY_LM.to_dict().items():
        if key != "arch" and value is not None:
            key = "train_seed" if key == "seed" else key
            args += [f"--{key.replace('_', '-')}", str(value)]
    assert world_main(args) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(path)
    assert "train_templates" in out
    assert world_main(["build", "--n-countries", "500"]) == 2


def test_command_line_builds_by_name_and_refuses_mixed_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[WorldConfig, TinyLMConfig]] = []

    def fake_build(world_config, model_config, **kwargs):  # records what the name resolved to
        seen.append((world_config, model_config))
        raise SystemExit(0)

    import lit_edit.world.__main__ as cli

    monkeypatch.setattr(cli, "build_tiny_model", fake_build)
    with pytest.raises(SystemExit):
        cli.main(["build", "--name", "tinyfacts-seed3", "--cache-dir", str(tmp_path)])
    world, model = seen[0]
    assert world.seed == 3 and model.seed == 3 and model.num_threads == 1
    assert cli.main(["build", "--name", "tinyfacts-seed3", "--seed", "4"]) == 2
    assert "--name tinyfacts-seed3 fixes every setting; drop --seed" in capsys.readouterr().err
    assert cli.main(["build", "--name", "nope"]) == 2


def test_a_build_leaves_the_callers_random_streams_alone(tmp_path: Path) -> None:
    """A cold cache must not change the run that triggered the build (the quick start does)."""
    import random

    import numpy as np

    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    config = TinyLMConfig(**{**TINY_LM.to_dict(), "max_epochs": 1})
    build_tiny_model(SMALL, config, cache_dir=tmp_path)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_named_defaults() -> None:
    configs = cache_module.default_model_configs()
    assert configs["tinyfacts"].arch == "gpt2" and configs["tinyfacts-llama"].arch == "llama"
    assert configs["tinyfacts"].n_layer == 2 and configs["tinyfacts"].n_embd == 128
    wide = configs["tinyfacts-wide"]
    assert wide.intermediate_size == 2048 and wide.n_layer == 2 and wide.n_embd == 128
    world, model = cache_module.named_configs("tinyfacts-wide-seed1")
    assert world == cache_module.named_configs("tinyfacts-seed1")[0] and model.seed == 1


def test_stale_temporary_builds_are_removed(tmp_path: Path) -> None:
    config = TinyLMConfig(**{**TINY_LM.to_dict(), "max_epochs": 1})
    final = cache_module.model_dir(SMALL, config, tmp_path)
    final.parent.mkdir(parents=True)
    stale = final.parent / f".{final.name}.dead"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert build_tiny_model(SMALL, config, cache_dir=tmp_path) == final
    assert not stale.exists() and cache_module.is_built(final)


def test_unknown_names_and_directories_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tinyfacts-llama"):
        resolve_tinyfacts("tinyfacts-bert", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="world.json"):
        load_world(tmp_path)


def test_pretraining_sequences(world: World) -> None:
    from lit_edit.world import pretrain

    pairs = world.pretraining_pairs()
    texts = {f"{p.prompt} {p.answer}" for p in pairs}
    for pid, alias in enumerate(world.aliases):
        for pair in world.alias_pairs(pid):
            assert f"{pair.prompt} {pair.answer}" in texts
        assert sum(alias in t for t in texts) >= len(world.alias_pairs(pid))
    tok = train_tokenizer(world.pretraining_texts(), 400)
    rows = pretrain.encode_rows(tok, pairs[:50], answer_weight=3.0)
    for (ids, weights), pair in zip(rows, pairs[:50], strict=True):
        enc = encode_pair(tok, pair.prompt, pair.answer)
        assert ids == enc.input_ids + [tok.eos_token_id]
        assert weights[0] == 0.0 and weights.count(3.0) == len(enc.answer_ids)
    batch = pretrain._collate(rows[:4], tok.pad_token_id)
    assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])
    assert (batch["weights"][batch["attention_mask"] == 0] == 0).all()
    sampler = LengthBucketSampler([len(r[0]) for r in rows], 8, seed=0)
    batches = list(iter(sampler))
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))


def test_warmup_cosine_factor_by_hand():
    from lit_edit.schedules import warmup_cosine_factor

    assert warmup_cosine_factor(0, warmup=4, total=12) == 0.25
    assert warmup_cosine_factor(3, warmup=4, total=12) == 1.0
    assert warmup_cosine_factor(4, warmup=4, total=12) == 1.0  # decay starts at 1
    assert warmup_cosine_factor(8, warmup=4, total=12, floor=0.1) == pytest.approx(0.55)
    assert warmup_cosine_factor(12, warmup=4, total=12, floor=0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(0, warmup=0, total=10) == 1.0  # no warm-up


def test_fresh_subjects_rename_only_the_edited_subject(default_world: World) -> None:
    from lit_edit.world.fresh import with_fresh_subjects
    from lit_edit.world.names import name_words

    records = default_world.edit_records(60, seed=2)
    fresh = with_fresh_subjects(default_world, records, seed=5)
    world_words = set().union(*(name_words(n) for ns in default_world.entities.values()
                                for n in ns), *(name_words(a) for a in default_world.aliases))
    names = [f.subject for f in fresh]
    assert len(set(names)) == len(names)  # one distinct name per record
    seen: set[str] = set()
    for old, new in zip(records, fresh, strict=True):
        assert new.subject is not None and old.subject is not None
        words = name_words(new.subject)
        assert not words & world_words and not words & seen  # never a word the model saw
        seen |= words
        assert new.prompt == old.prompt.replace(old.subject, new.subject)
        assert old.subject not in new.prompt and new.subject in new.prompt
        assert new.rephrase_prompts == tuple(
            p.replace(old.subject, new.subject) for p in old.rephrase_prompts)
        assert (new.target_new, new.ground_truth) == (old.target_new, old.ground_truth)
        assert new.locality == old.locality  # real subjects, true answers: unchanged
        assert "subject_aliasing" not in new.portability
        for pairs in new.portability.values():
            assert all(new.subject in p.prompt for p in pairs)
        kept = [p for k, ps in old.portability.items() if k != "subject_aliasing" for p in ps
                if old.subject in p.prompt]
        assert sum(len(ps) for ps in new.portability.values()) == len(kept)
        assert new.meta["original_subject"] == old.subject
        # shape of the subject's type: people have two words, companies keep a suffix
        if new.meta["subject_type"] == "person":
            assert len(new.subject.split()) == 2
    assert with_fresh_subjects(default_world, records, seed=5) == fresh  # seeded
    assert with_fresh_subjects(default_world, records, seed=6) != fresh


def test_fresh_subjects_keep_the_split(default_world: World) -> None:
    from lit_edit.data import TinyFactsDataModule

    real = TinyFactsDataModule(n_test=300, n_val=40, record_seed=3).load_records("fit")
    fresh = TinyFactsDataModule(n_test=300, n_val=40, record_seed=3,
                                fresh_subjects=True).load_records("fit")
    for split in ("train", "val"):
        assert [r.meta["original_subject"] for r in fresh[split]] == [
            r.subject for r in real[split]]
        assert [r.target_new for r in fresh[split]] == [r.target_new for r in real[split]]
