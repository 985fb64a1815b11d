"""The TinyFacts world: seeded generation of entities and facts, pretraining text, JSON form."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_edit.records import EditRecord, QAPair
from lit_edit.world.config import WorldConfig
from lit_edit.world.names import generate_names
from lit_edit.world.templates import (
    Composition,
    Relation,
    alias_templates,
    compositions,
    relations,
)

FORMAT = "tinyfacts-world/1"


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple of the world.

    Attributes:
        index: Position in :attr:`World.facts`.
        relation: Relation name.
        subject: Subject name.
        object: Object name (the true answer).
        subject_id: Index of the subject among the entities of its type.
        object_id: Index of the object among the entities of its type.
        train_templates: Indices of the relation's templates pretrained with this fact.
        held_out_templates: Indices of the templates never pretrained with this fact.
        alias_templates: The training templates in which the fact is phrased with the subject's
            alias (people only; empty for other subjects).
    """

    index: int
    relation: str
    subject: str
    object: str
    subject_id: int
    object_id: int
    train_templates: tuple[int, ...]
    held_out_templates: tuple[int, ...]
    alias_templates: tuple[int, ...] = ()


@dataclass(frozen=True)
class TwoHopFact:
    """A composed fact ``second(first(subject))``.

    Attributes:
        composition: Composition name.
        subject: Subject name.
        bridge: The intermediate entity (object of the first hop).
        object: The answer (object of the second hop).
        first_fact: Index of the first-hop fact.
        second_fact: Index of the second-hop fact.
        train_templates: Composition templates pretrained with this fact (if ``pretrained``).
        held_out_templates: Composition templates never pretrained with this fact.
        pretrained: Whether any phrasing of this two-hop fact is in the pretraining text.
    """

    composition: str
    subject: str
    bridge: str
    object: str
    first_fact: int
    second_fact: int
    train_templates: tuple[int, ...]
    held_out_templates: tuple[int, ...]
    pretrained: bool


def _assign_held_out(rng: random.Random, n_facts: int, n_templates: int, k: int) -> list[tuple]:
    """Held-out template sets for ``n_facts`` facts, each template held out equally often."""
    combos = list(itertools.combinations(range(n_templates), k))
    rng.shuffle(combos)
    order = list(range(n_facts))
    rng.shuffle(order)
    out: list[tuple[int, ...]] = [()] * n_facts
    for rank, fact in enumerate(order):
        out[fact] = combos[rank % len(combos)]
    return out


class World:
    """A generated TinyFacts world: entities, facts, two-hop facts and aliases.

    Build one with :meth:`generate`; everything is a deterministic function of its
    :class:`WorldConfig`, so a world is stored as its config (:meth:`to_json`).

    Attributes:
        config: The settings the world was generated from.
        entities: Names of each entity type (``person``, ``city``, ``country``, ``company``,
            ``language``).
        aliases: One alias per person (same order as ``entities["person"]``).
        alias_pretrained: Per person, whether its facts are pretrained phrased with its alias
            (in the templates :attr:`Fact.alias_templates`).
        facts: All single-hop facts, grouped by relation in :func:`relations` order.
        two_hop: All two-hop facts, grouped by composition.
        relations: The relations by name.
        compositions: The two-hop relations by name.
        facts_of: The facts of each relation, by relation name.
    """

    def __init__(
        self,
        config: WorldConfig,
        entities: dict[str, tuple[str, ...]],
        aliases: tuple[str, ...],
        alias_pretrained: tuple[bool, ...],
        facts: tuple[Fact, ...],
        two_hop: tuple[TwoHopFact, ...],
    ) -> None:
        self.config = config
        self.entities = entities
        self.aliases = aliases
        self.alias_pretrained = alias_pretrained
        self.facts = facts
        self.two_hop = two_hop
        self.relations: dict[str, Relation] = {r.name: r for r in relations()}
        self.compositions: dict[str, Composition] = {c.name: c for c in compositions()}
        self._by_key = {(f.relation, f.subject_id): f for f in facts}
        self.facts_of: dict[str, tuple[Fact, ...]] = {
            r: tuple(f for f in facts if f.relation == r) for r in self.relations
        }
        self._two_hop_from = {(t.composition, t.first_fact): t for t in two_hop}
        users: dict[tuple[str, int], list[TwoHopFact]] = {}
        for t in two_hop:
            users.setdefault((t.composition, t.second_fact), []).append(t)
        self._two_hop_via = {k: tuple(v) for k, v in users.items()}
        self._alias_of = dict(zip(entities["person"], aliases, strict=True))

    @classmethod
    def generate(cls, config: WorldConfig | None = None) -> World:
        """Generate the world of ``config`` (the default world when ``None``)."""
        config = config or WorldConfig()
        rng = random.Random(config.seed)
        n = {
            "person": config.n_people,
            "city": config.n_cities,
            "country": config.n_countries,
            "company": config.n_companies,
            "language": config.n_languages,
        }
        names = generate_names(rng, {**n, "alias": config.n_people})
        entities = {k: names[k] for k in n}
        # objects of each relation, by subject id
        country_of = list(rng.sample(range(n["country"]), n["country"]))
        country_of += [rng.randrange(n["country"]) for _ in range(n["city"] - n["country"])]
        rng.shuffle(country_of)
        capital = [
            rng.choice([c for c, k in enumerate(country_of) if k == country])
            for country in range(n["country"])
        ]
        objects: dict[str, list[int]] = {
            "born_in": [rng.randrange(n["city"]) for _ in range(n["person"])],
            "lives_in": [rng.randrange(n["city"]) for _ in range(n["person"])],
            "works_for": [rng.randrange(n["company"]) for _ in range(n["person"])],
            "speaks": [rng.randrange(n["language"]) for _ in range(n["person"])],
            "located_in": country_of,
            "capital_of": capital,
            "headquartered_in": [rng.randrange(n["city"]) for _ in range(n["company"])],
            "official_language": [rng.randrange(n["language"]) for _ in range(n["country"])],
        }
        facts: list[Fact] = []
        for rel in relations():
            held = _assign_held_out(
                rng, len(objects[rel.name]), len(rel.templates), config.held_out_per_fact
            )
            for sid, oid in enumerate(objects[rel.name]):
                train = tuple(t for t in range(len(rel.templates)) if t not in held[sid])
                n_alias = config.alias_templates_per_fact if rel.subject_type == "person" else 0
                facts.append(Fact(
                    index=len(facts),
                    relation=rel.name,
                    subject=entities[rel.subject_type][sid],
                    object=entities[rel.object_type][oid],
                    subject_id=sid,
                    object_id=oid,
                    train_templates=train,
                    held_out_templates=tuple(sorted(held[sid])),
                    alias_templates=tuple(sorted(rng.sample(train, n_alias))),
                ))
        by_key = {(f.relation, f.subject_id): f for f in facts}
        two_hop: list[TwoHopFact] = []
        for comp in compositions():
            firsts = [f for f in facts if f.relation == comp.first]
            held = _assign_held_out(
                rng, len(firsts), len(comp.templates), config.two_hop_held_out_per_fact
            )
            n_seen = round(config.two_hop_train_fraction * len(firsts))
            seen = set(rng.sample(range(len(firsts)), n_seen))
            for i, first in enumerate(firsts):
                second = by_key[(comp.second, first.object_id)]
                two_hop.append(TwoHopFact(
                    composition=comp.name,
                    subject=first.subject,
                    bridge=first.object,
                    object=second.object,
                    first_fact=first.index,
                    second_fact=second.index,
                    train_templates=tuple(
                        t for t in range(len(comp.templates)) if t not in held[i]
                    ),
                    held_out_templates=tuple(sorted(held[i])),
                    pretrained=i in seen,
                ))
        n_alias = round(config.alias_train_fraction * n["person"])
        alias_seen = set(rng.sample(range(n["person"]), n_alias))
        return cls(
            config=config,
            entities=entities,
            aliases=names["alias"],
            alias_pretrained=tuple(p in alias_seen for p in range(n["person"])),
            facts=tuple(facts),
            two_hop=tuple(two_hop),
        )

    # ----------------------------------------------------------------------------- look-ups
    def fact(self, relation: str, subject_id: int) -> Fact:
        """Return the fact of ``relation`` about the subject with id ``subject_id``.

        Raises:
            KeyError: if there is no such fact.
        """
        try:
            return self._by_key[(relation, subject_id)]
        except KeyError:
            raise KeyError(f"no {relation!r} fact about subject id {subject_id}") from None

    def two_hop_of(self, composition: str, first_fact: int) -> TwoHopFact:
        """Return the two-hop fact of ``composition`` whose first hop is fact ``first_fact``."""
        return self._two_hop_from[(composition, first_fact)]

    def two_hop_via(self, composition: str, second_fact: int) -> tuple[TwoHopFact, ...]:
        """Return the two-hop facts of ``composition`` whose second hop is fact ``second_fact``."""
        return self._two_hop_via.get((composition, second_fact), ())

    def alias(self, person: str) -> str:
        """Return the alias of a person (by name)."""
        return self._alias_of[person]

    def prompt(self, fact: Fact, template: int, subject: str | None = None) -> str:
        """Return ``fact`` phrased with its relation's template ``template`` (object cut off)."""
        return self.relations[fact.relation].templates[template].format(s=subject or fact.subject)

    def pairs(self, fact: Fact, which: str = "train") -> tuple[QAPair, ...]:
        """Return ``fact`` as (prompt, true object) pairs in its ``"train"`` or ``"held_out"`` templates."""  # noqa: E501
        if which not in ("train", "held_out"):
            raise ValueError(f"which must be 'train' or 'held_out', got {which!r}")
        ids = fact.train_templates if which == "train" else fact.held_out_templates
        return tuple(QAPair(self.prompt(fact, t), fact.object) for t in ids)

    def two_hop_pairs(self, fact: TwoHopFact, which: str = "held_out") -> tuple[QAPair, ...]:
        """Return a two-hop fact as (prompt, answer) pairs in its ``"train"``/``"held_out"`` templates."""  # noqa: E501
        if which not in ("train", "held_out"):
            raise ValueError(f"which must be 'train' or 'held_out', got {which!r}")
        ids = fact.train_templates if which == "train" else fact.held_out_templates
        templates = self.compositions[fact.composition].templates
        return tuple(QAPair(templates[t].format(s=fact.subject), fact.object) for t in ids)

    def alias_pairs(self, person_id: int) -> tuple[QAPair, ...]:
        """Return the alias statements of a person as (prompt, answer) pairs."""
        name, alias = self.entities["person"][person_id], self.aliases[person_id]
        out = []
        for template in alias_templates():
            head, _, _ = template.rpartition(" ")
            answer = alias if template.endswith("{a}") else name
            out.append(QAPair(head.format(s=name, a=alias), answer))
        return tuple(out)

    def alias_fact_pairs(self, fact: Fact) -> tuple[QAPair, ...]:
        """Return a person's fact phrased with the alias in its ``alias_templates`` (else ())."""
        if not fact.alias_templates:
            return ()
        alias = self.aliases[fact.subject_id]
        return tuple(QAPair(self.prompt(fact, t, alias), fact.object)
                     for t in fact.alias_templates)

    # ------------------------------------------------------------------------ pretraining
    def pretraining_pairs(self) -> list[QAPair]:
        """Every (prompt, answer) pair of the pretraining text, in a fixed order.

        That is each fact in each of its training templates, each alias statement, each fact of
        an ``alias_pretrained`` person phrased with the alias (in its ``alias_templates``), and
        each ``pretrained`` two-hop fact in its training templates.
        """
        out: list[QAPair] = []
        for fact in self.facts:
            out.extend(self.pairs(fact, "train"))
            if fact.alias_templates and self.alias_pretrained[fact.subject_id]:
                out.extend(self.alias_fact_pairs(fact))
        for pid in range(len(self.aliases)):
            out.extend(self.alias_pairs(pid))
        for fact in self.two_hop:
            if fact.pretrained:
                out.extend(self.two_hop_pairs(fact, "train"))
        return out

    def pretraining_texts(self) -> list[str]:
        """The pretraining text: one whole-fact sequence ``prompt + " " + answer`` per pair."""
        return [f"{p.prompt} {p.answer}" for p in self.pretraining_pairs()]

    # ------------------------------------------------------------------------ edit records
    def edit_records(
        self,
        n: int | None = None,
        *,
        seed: int = 0,
        relations: Sequence[str] | None = None,
        n_locality: int = 3,
    ) -> list[EditRecord]:
        """Return edit records for facts of this world (see :func:`make_edit_records`)."""
        from lit_edit.world.edits import make_edit_records

        return make_edit_records(self, n, seed=seed, relations=relations, n_locality=n_locality)

    # ------------------------------------------------------------------------ persistence
    def fingerprint(self) -> str:
        """A hash of the generated content (detects a generator that changed since saving)."""
        digest = hashlib.sha256()
        for text in self.pretraining_texts():
            digest.update(text.encode("utf-8") + b"\n")
        for fact in self.facts:
            digest.update(f"{fact.held_out_templates}".encode())
        return digest.hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form: format, config and fingerprint (the content is regenerated)."""
        return {
            "format": FORMAT, "config": self.config.to_dict(), "fingerprint": self.fingerprint()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], check: bool = True) -> World:
        """Regenerate a world from :meth:`to_dict` output.

        Args:
            data: The JSON form.
            check: Verify that the regenerated content matches the stored fingerprint.

        Raises:
            ValueError: on another format, or if the content differs (the generator changed).
        """
        if data.get("format") != FORMAT:
            raise ValueError(f"not a TinyFacts world (format {data.get('format')!r}, "
                             f"expected {FORMAT!r})")
        world = cls.generate(WorldConfig.from_dict(data["config"]))
        if check and data.get("fingerprint") not in (None, world.fingerprint()):
            raise ValueError(
                "the world regenerated from this config differs from the saved one (the "
                "generator changed since it was saved); rebuild the model with --force"
            )
        return world

    def to_json(self) -> str:
        """Serialise to a JSON string (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> World:
        """Regenerate from :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> World:
        """Read a world saved with :meth:`save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def __len__(self) -> int:
        return len(self.facts)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.entities.items())
        return f"World(seed={self.config.seed}, facts={len(self.facts)}, {sizes})"
