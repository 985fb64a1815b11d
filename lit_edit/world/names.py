"""Invented, pronounceable names for the entities of a TinyFacts world.

Each entity type has its own shape (people: ``"First Last"`` with a one-word alias, cities end
like ``"-holt"``, countries like ``"-ia"``, companies like ``" Labs"``, languages like ``"-ish"``),
so a name's type is visible from its form, as with real names. All names of a world are distinct
and no two share a word (company suffixes aside).
"""

from __future__ import annotations

import random


def _syllables() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    onsets = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s",
              "st", "t", "tr", "v", "z", "sh", "th", "j")
    vowels = ("a", "e", "i", "o", "u", "ae", "ia", "ou", "ei")
    codas = ("", "", "", "n", "r", "l", "s", "m", "k", "th")
    return onsets, vowels, codas


def _suffixes() -> dict[str, tuple[str, ...]]:
    return {
        "city": ("holt", "mere", "ford", "burg", "dale", "port", "wick", "grad", "ton", "vik"),
        "country": ("ia", "land", "stan", "ora", "ica", "mark"),
        "company": (" Labs", " Group", " Works", " Systems", " Motors", " Foods", " Bank",
                    " Media"),
        "language": ("ish", "ese", "ic", "an", "i"),
    }


def _stem(rng: random.Random, n_syllables: int) -> str:
    onsets, vowels, codas = _syllables()
    parts = [rng.choice(onsets) + rng.choice(vowels) for _ in range(n_syllables)]
    parts[-1] += rng.choice(codas)
    return "".join(parts)


def _one(rng: random.Random, kind: str) -> str:
    if kind == "person":
        return f"{_stem(rng, rng.choice((1, 2))).capitalize()} {_stem(rng, 2).capitalize()}"
    if kind == "alias":
        return _stem(rng, 2).capitalize()
    if kind in ("city", "country", "language"):
        return _stem(rng, rng.choice((1, 2))).capitalize() + rng.choice(_suffixes()[kind])
    if kind == "company":
        return _stem(rng, 2).capitalize() + rng.choice(_suffixes()[kind])
    raise ValueError(f"unknown entity kind {kind!r}")


def generate_names(rng: random.Random, counts: dict[str, int]) -> dict[str, tuple[str, ...]]:
    """Draw distinct names for each kind of entity.

    Args:
        rng: Source of randomness (consumed in a fixed order, so the result is seeded).
        counts: Number of names per kind, among ``person``, ``alias``, ``city``, ``country``,
            ``company`` and ``language``; kinds are drawn in this order.

    Returns:
        The names of each kind, in drawing order.

    Raises:
        RuntimeError: if the name space is too small for the requested counts.
    """
    order = ("person", "alias", "city", "country", "company", "language")
    words: set[str] = set()  # distinct distinctive words: no shared first/last names etc.
    out: dict[str, tuple[str, ...]] = {}
    for kind in order:
        names: list[str] = []
        for _ in range(counts.get(kind, 0)):
            name = draw_name(rng, kind, words)
            words |= name_words(name)
            names.append(name)
        out[kind] = tuple(names)
    return out


def _shared_words() -> frozenset[str]:
    """Words that may occur in many names (company suffixes)."""
    return frozenset(s.strip() for s in _suffixes()["company"])


def name_words(name: str) -> set[str]:
    """The distinctive words of a name (company suffixes left out)."""
    return {w for w in name.split() if w not in _shared_words()}


def draw_name(rng: random.Random, kind: str, taken_words: set[str]) -> str:
    """One new name of ``kind`` sharing no distinctive word with ``taken_words``.

    Raises:
        RuntimeError: if no such name turns up in 10,000 draws.
    """
    for _ in range(10_000):
        name = _one(rng, kind)
        if not name_words(name) & taken_words:
            return name
    raise RuntimeError(f"could not draw a fresh {kind} name")
