"""Relations of a TinyFacts world, their phrasings, two-hop compositions and alias statements.

Every template is a prompt with ``{s}`` for the subject; the object always comes right after it,
so a fact's text is ``template.format(s=subject) + " " + object`` (the scoring convention).
"""

from __future__ import annotations

from dataclasses import dataclass

ENTITY_TYPES: tuple[str, ...] = ("person", "city", "country", "company", "language")


@dataclass(frozen=True)
class Relation:
    """A relation between two entity types with its phrasings.

    Attributes:
        name: Identifier, e.g. ``"born_in"``.
        subject_type: Entity type of the subject.
        object_type: Entity type of the object.
        templates: Prompts with ``{s}``, statements and questions, the object following each.
    """

    name: str
    subject_type: str
    object_type: str
    templates: tuple[str, ...]


@dataclass(frozen=True)
class Composition:
    """A two-hop relation ``second(first(s))`` with its phrasings.

    Attributes:
        name: Identifier, e.g. ``"birth_country"``.
        first: Name of the first relation (applied to the subject).
        second: Name of the second relation (applied to the first one's object).
        templates: Prompts with ``{s}`` whose answer is the second relation's object.
    """

    name: str
    first: str
    second: str
    templates: tuple[str, ...]


def relations() -> tuple[Relation, ...]:
    """Return the relations of a TinyFacts world (6 templates each: 3 statements, 3 questions)."""
    return (
        Relation("born_in", "person", "city", (
            "{s} was born in",
            "The birthplace of {s} is",
            "{s} is a native of the city of",
            "Where was {s} born?",
            "In which city was {s} born?",
            "Q: What is the birth city of {s}? A:",
        )),
        Relation("lives_in", "person", "city", (
            "{s} lives in",
            "{s} currently resides in",
            "The home of {s} is the city of",
            "Where does {s} live?",
            "In which city does {s} live now?",
            "Q: Which city is the residence of {s}? A:",
        )),
        Relation("works_for", "person", "company", (
            "{s} works for",
            "{s} is employed by",
            "The employer of {s} is",
            "Who employs {s}?",
            "Which company does {s} work for?",
            "Q: Where does {s} work? A:",
        )),
        Relation("speaks", "person", "language", (
            "{s} speaks",
            "The language spoken by {s} is",
            "{s} is fluent in",
            "What language does {s} speak?",
            "Which language is spoken by {s}?",
            "Q: In what language does {s} talk? A:",
        )),
        Relation("located_in", "city", "country", (
            "{s} is located in",
            "The city of {s} lies in",
            "{s} is a city in",
            "In which country is {s}?",
            "Which country is {s} part of?",
            "Q: Where is {s} located? A:",
        )),
        Relation("capital_of", "country", "city", (
            "The capital of {s} is",
            "The capital city of {s} is",
            "The seat of government of {s} is",
            "What is the capital of {s}?",
            "Which city is the capital of {s}?",
            "Q: Name the capital of {s}. A:",
        )),
        Relation("headquartered_in", "company", "city", (
            "{s} is headquartered in",
            "The headquarters of {s} are in",
            "{s} has its main office in",
            "Where is {s} headquartered?",
            "In which city is {s} based?",
            "Q: Where are the headquarters of {s}? A:",
        )),
        Relation("official_language", "country", "language", (
            "The official language of {s} is",
            "In {s}, the official language is",
            "{s} has as its official language",
            "What is the official language of {s}?",
            "Which language is official in {s}?",
            "Q: What language is official in {s}? A:",
        )),
    )


def compositions() -> tuple[Composition, ...]:
    """Return the two-hop relations (3 templates each)."""
    return (
        Composition("birth_country", "born_in", "located_in", (
            "{s} was born in a city located in",
            "The country where {s} was born is",
            "In which country was {s} born?",
        )),
        Composition("residence_country", "lives_in", "located_in", (
            "{s} lives in a city located in",
            "The country where {s} lives is",
            "In which country does {s} live?",
        )),
        Composition("employer_city", "works_for", "headquartered_in", (
            "{s} works for a company headquartered in",
            "The employer of {s} is based in the city of",
            "In which city is the employer of {s} based?",
        )),
        Composition("company_country", "headquartered_in", "located_in", (
            "{s} is headquartered in a city located in",
            "The country where {s} has its headquarters is",
            "In which country is {s} based?",
        )),
        Composition("city_language", "located_in", "official_language", (
            "The official language of the country where {s} lies is",
            "In the country of {s}, the official language is",
            "What is the official language in {s}?",
        )),
    )


def alias_templates() -> tuple[str, ...]:
    """Return the alias statements: ``{s}`` is the name, ``{a}`` the alias, object last."""
    return (
        "{s} is also known as {a}",
        "{a} is another name for {s}",
    )
