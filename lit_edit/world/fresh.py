"""Edit records about invented subjects: a TinyFacts fact moved onto a name no model has seen.

LTE's alignment must teach a model to apply the fact in its prompt to *any* subject. Trained only
on the subjects of the training split, a small model learns those subjects' answers instead of
reading the prompt, and on held-out subjects it answers from memory. Records whose subject is a
fresh invented name (same shape as the world's names, sharing no word with them) can only be
answered by reading the fact: :func:`with_fresh_subjects` makes them from ordinary records.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from lit_edit.records import EditRecord, QAPair
from lit_edit.world.generator import World
from lit_edit.world.names import draw_name, name_words


def rename_subject(record: EditRecord, name: str) -> EditRecord:
    """The record with its subject replaced by ``name`` wherever it names the edited subject.

    The edit prompt, the rephrases and the fact change; portability questions that mention the
    subject are renamed and the others (questions about someone else, alias questions) are
    dropped, since their answers go through the real subject; locality pairs are kept as they are
    (questions about real subjects, true answers: the new subject must not change them).

    Args:
        record: A record with a ``subject`` (and a ``subject_aliasing`` group, if any, dropped).
        name: The new subject name.

    Raises:
        ValueError: if the record has no subject.
    """
    subject = record.subject
    if not subject:
        raise ValueError(f"record {record.index} of {record.source!r} has no subject to rename")
    portability = {}
    for key, pairs in record.portability.items():
        kept = tuple(
            QAPair(p.prompt.replace(subject, name), p.answer, p.aliases)
            for p in pairs
            if subject in p.prompt and key != "subject_aliasing"
        )
        if kept:
            portability[key] = kept
    return replace(
        record,
        prompt=record.prompt.replace(subject, name),
        subject=name,
        rephrase_prompts=tuple(p.replace(subject, name) for p in record.rephrase_prompts),
        portability=portability,
        generation_prompts=tuple(p.replace(subject, name) for p in record.generation_prompts),
        meta={**record.meta, "fresh_subject": True, "original_subject": subject},
    )


def with_fresh_subjects(
    world: World, records: Sequence[EditRecord], seed: int | str = 0
) -> list[EditRecord]:
    """Move each record onto a fresh invented subject (one distinct name per record).

    Names have the shape of the subject's type (``meta["subject_type"]``) and share no word with
    the world's names nor with each other.

    Args:
        world: The world the records come from.
        records: TinyFacts records (:func:`~lit_edit.world.edits.make_edit_record`).
        seed: Seed of the names (any value `random.Random` takes as a string).

    Returns:
        The renamed records, in input order.
    """
    rng = random.Random(f"tinyfacts-fresh/{seed}")
    taken = set().union(*(name_words(n) for names in world.entities.values() for n in names))
    taken |= set().union(*(name_words(a) for a in world.aliases))
    out = []
    for record in records:
        name = draw_name(rng, str(record.meta["subject_type"]), taken)
        taken |= name_words(name)
        out.append(rename_subject(record, name))
    return out
