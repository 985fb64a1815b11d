"""Edit records (:class:`lit_edit.records.EditRecord`) drawn from a TinyFacts world."""

from __future__ import annotations

import random
from collections.abc import Sequence

from lit_edit.records import EditRecord, QAPair
from lit_edit.world.generator import Fact, World


def _new_object(world: World, fact: Fact, rng: random.Random) -> int:
    """A seeded object id of the fact's object type, other than the true one.

    When the relation is the first hop of a two-hop relation, objects whose second hop differs
    from the true object's are preferred, so the two-hop answer implied by the edit changes.
    """
    object_type = world.relations[fact.relation].object_type
    candidates = [i for i in range(len(world.entities[object_type])) if i != fact.object_id]
    seconds = [c.second for c in world.compositions.values() if c.first == fact.relation]
    if seconds:
        def hop(obj: int) -> tuple[int, ...]:
            """The second-hop objects reached from ``obj``."""
            return tuple(world.fact(s, obj).object_id for s in seconds)

        changing = [c for c in candidates if all(
            a != b for a, b in zip(hop(c), hop(fact.object_id), strict=True))]
        candidates = changing or candidates
    return rng.choice(candidates)


def _two_hop(world: World, fact: Fact, new_id: int, rng: random.Random) -> tuple[QAPair, ...]:
    """Two-hop questions whose answers follow from the edited fact."""
    out: list[QAPair] = []
    for comp in world.compositions.values():
        if comp.first == fact.relation:
            # second(new object) is the new answer of the subject's two-hop question
            two = world.two_hop_of(comp.name, fact.index)
            ids = two.held_out_templates or two.train_templates
            answer = world.fact(comp.second, new_id).object
            out.append(QAPair(comp.templates[rng.choice(ids)].format(s=two.subject), answer))
        elif comp.second == fact.relation:
            # someone whose first hop lands on this subject now gets the new object
            users = world.two_hop_via(comp.name, fact.index)
            if users:
                two = rng.choice(users)
                ids = two.held_out_templates or two.train_templates
                new_object = world.entities[world.relations[fact.relation].object_type][new_id]
                out.append(QAPair(comp.templates[rng.choice(ids)].format(s=two.subject),
                                  new_object))
    return tuple(out)


def _neighborhood(
    world: World, fact: Fact, template: int, k: int, rng: random.Random
) -> tuple[QAPair, ...]:
    """Up to ``k`` facts of other subjects with the same relation and their true objects.

    Subjects sharing the edited fact's true object come first (CounterFact's neighbourhood);
    each is phrased with the edit prompt's template when that template is pretrained for it.
    """
    same = [f for f in world.facts_of[fact.relation] if f.index != fact.index]
    rng.shuffle(same)
    same.sort(key=lambda f: f.object_id != fact.object_id)  # stable: same object first
    out = []
    for other in same[:k]:
        t = template if template in other.train_templates else rng.choice(other.train_templates)
        out.append(QAPair(world.prompt(other, t), other.object))
    return tuple(out)


def _other_relations(world: World, fact: Fact, k: int, rng: random.Random) -> tuple[QAPair, ...]:
    """Up to ``k`` facts of the same subject with other relations and their true objects."""
    subject_type = world.relations[fact.relation].subject_type
    others = [
        world.fact(rel.name, fact.subject_id)
        for rel in world.relations.values()
        if rel.subject_type == subject_type and rel.name != fact.relation
    ]
    rng.shuffle(others)
    return tuple(
        QAPair(world.prompt(o, rng.choice(o.train_templates)), o.object) for o in others[:k]
    )


def make_edit_record(world: World, fact: Fact, seed: int = 0, n_locality: int = 3) -> EditRecord:
    """Turn one fact into an edit request.

    Args:
        world: The world the fact belongs to.
        fact: The fact to edit.
        seed: Seed of the random choices (combined with the fact index, so a fact's record does
            not depend on which other facts are drawn).
        n_locality: Pairs per locality group.

    Returns:
        A record with ``prompt`` = one of the fact's pretrained phrasings (object cut off),
        ``target_new`` = another entity of the object's type, ``ground_truth`` = the true object,
        ``rephrase_prompts`` = the fact's held-out phrasings, ``portability`` groups
        ``two_hop`` (questions whose answer follows from the new fact) and ``subject_aliasing``
        (the fact phrased with the subject's alias; people only), and ``locality`` groups
        ``neighborhood`` (other subjects, same relation, true objects) and ``other_relation``
        (same subject, other relations, true objects). Empty groups are left out.
    """
    rng = random.Random(f"tinyfacts-edit/{seed}/{fact.index}")
    relation = world.relations[fact.relation]
    template = rng.choice(fact.train_templates)
    new_id = _new_object(world, fact, rng)
    target_new = world.entities[relation.object_type][new_id]
    portability: dict[str, tuple[QAPair, ...]] = {}
    two_hop = _two_hop(world, fact, new_id, rng)
    if two_hop:
        portability["two_hop"] = two_hop
    alias_pairs = world.alias_fact_pairs(fact)
    if alias_pairs:
        portability["subject_aliasing"] = tuple(QAPair(p.prompt, target_new) for p in alias_pairs)
    locality: dict[str, tuple[QAPair, ...]] = {}
    if n_locality > 0:
        locality["neighborhood"] = _neighborhood(world, fact, template, n_locality, rng)
        other = _other_relations(world, fact, n_locality, rng)
        if other:
            locality["other_relation"] = other
    prompt = world.prompt(fact, template)
    return EditRecord(
        prompt=prompt,
        target_new=target_new,
        ground_truth=(fact.object,),
        subject=fact.subject,
        rephrase_prompts=tuple(world.prompt(fact, t) for t in fact.held_out_templates),
        locality=locality,
        portability=portability,
        generation_prompts=(prompt,),
        source="tinyfacts",
        index=fact.index,
        meta={
            "relation": fact.relation,
            "subject_type": relation.subject_type,
            "object_type": relation.object_type,
            "subject_id": fact.subject_id,
            "object_id": fact.object_id,
            "new_object_id": new_id,
            "template": template,
            "alias_pretrained": (relation.subject_type == "person"
                                 and world.alias_pretrained[fact.subject_id]),
            "world_seed": world.config.seed,
        },
    )


def make_edit_records(
    world: World,
    n: int | None = None,
    *,
    seed: int = 0,
    relations: Sequence[str] | None = None,
    n_locality: int = 3,
) -> list[EditRecord]:
    """Draw edit records for facts of a world (deterministic given ``seed``).

    Args:
        world: The world.
        n: Number of records; ``None`` for one per fact.
        seed: Seed of the choice of facts and of each record's random choices.
        relations: Restrict to these relation names (default: all).
        n_locality: Pairs per locality group.

    Returns:
        Records in a seeded random order of facts (so the first ``n`` mix all relations); see
        :func:`make_edit_record`.

    Raises:
        ValueError: on an unknown relation or if ``n`` exceeds the number of candidate facts.
    """
    if relations is not None:
        unknown = sorted(set(relations) - set(world.relations))
        if unknown:
            raise ValueError(f"unknown relation(s) {unknown}; known: {sorted(world.relations)}")
    facts = [f for f in world.facts if relations is None or f.relation in relations]
    if n is not None and not 0 <= n <= len(facts):
        raise ValueError(f"asked for {n} edit records but there are {len(facts)} candidate facts")
    random.Random(f"tinyfacts-order/{seed}").shuffle(facts)
    return [make_edit_record(world, f, seed, n_locality) for f in facts[: n if n is not None
                                                                       else len(facts)]]
