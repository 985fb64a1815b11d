"""ZsRE in the MEND format (``zsre_mend_*.json``), with or without GPT-4 ``portability``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lit_edit.data.base import RecordReader
from lit_edit.data.fields import RawRecord
from lit_edit.records import EditRecord, QAPair

GPT4_PORTABILITY_KEYS = frozenset(("New Question", "New Answer", "Recalled Relation"))
"""The keys read from EasyEdit's GPT-4 ``portability`` object."""


def gpt4_portability(
    rec: RawRecord, portability: dict[str, tuple[QAPair, ...]], meta: dict[str, Any]
) -> None:
    """Read EasyEdit's GPT-4 ``portability`` object, if present (One Hop portability).

    ``{Recalled Relation, New Question, New Answer}`` → ``portability["one_hop"]`` and
    ``meta["recalled_relation"]``.

    Args:
        rec: The record holding the optional ``portability`` object.
        portability: Receives the ``one_hop`` group.
        meta: Receives ``recalled_relation``.

    Raises:
        RecordError: if ``portability`` is not an object or its fields have the wrong type.
    """
    if not rec.has("portability"):
        return
    port = rec.child("portability")
    one_hop = port.pair("New Question", "New Answer")
    if one_hop is not None:
        portability["one_hop"] = (one_hop,)
    recalled = port.optional_text("Recalled Relation")
    if recalled is not None:
        meta["recalled_relation"] = recalled


def subject_replace(
    rec: RawRecord, subject: str, prompt: str, target_new: str
) -> tuple[QAPair, ...]:
    """The subject-replace portability pair: the edit prompt asked with ``alternative_subject``.

    Args:
        rec: The record holding the optional ``alternative_subject``.
        subject: The edited subject (it occurs in ``prompt``).
        prompt: The edit prompt.
        target_new: The new answer, also expected for the alternative subject.

    Returns:
        ``(QAPair(prompt with subject replaced, target_new),)``, or ``()`` when the field is
        absent (or empty, with a note).

    Raises:
        RecordError: if ``alternative_subject`` is not a string.
    """
    alternative = rec.optional_text("alternative_subject")
    if alternative is None:
        return ()
    return (QAPair(prompt.replace(subject, alternative), target_new),)


class ZsreReader(RecordReader):
    """ZsRE, MEND format: ``{subject, src, rephrase, alt, answers, loc?, loc_ans?, pred?, cond?}``.

    Mapping (EasyEdit ``ZsreDataset`` and its portability data):

    * ``src`` → ``prompt``; ``alt`` → ``target_new``; ``answers`` → ``ground_truth``
      (normalised, first answer scored); ``subject`` → ``subject``;
    * ``rephrase`` → ``rephrase_prompts = (rephrase,)``;
    * ``loc``/``loc_ans`` → ``locality["nq"] = (QAPair(loc, loc_ans),)``, keeping the
      ``"nq question: "`` prefix as EasyEdit does; a record without ``loc`` (the portability
      variants) has an empty locality;
    * ``portability`` (eval slice, One Hop) → ``portability["one_hop"] = (QAPair(New Question,
      New Answer),)``, its ``Recalled Relation`` → ``meta["recalled_relation"]``;
    * ``alternative_subject`` (Subject Replace) → ``portability["subject_replace"] =
      (QAPair(src with subject replaced by alternative_subject, alt),)``;
    * ``inverse question`` (Inverse Relation) → ``portability["inverse_relation"] =
      (QAPair(inverse question, subject),)``: the inverse question asks for the subject;
    * ``meta["loc_prompt"] = loc + " " + loc_ans`` (WISE's irrelevant training sentence);
      other fields (``cond``, ``pred``, ...) are kept verbatim in ``meta`` (and reported as
      unused).

    An empty ``alt`` (two records of ``zsre_mend_train-1k.json``) makes the record invalid, as
    EasyEdit drops such records.
    """

    format_name = "zsre"
    description = "ZsRE, MEND format (src, alt, answers, rephrase, loc, loc_ans[, portability])"
    used_keys = frozenset(
        (
            "src",
            "alt",
            "subject",
            "rephrase",
            "answers",
            "loc",
            "loc_ans",
            "portability",
            "alternative_subject",
            "inverse question",
        )
    )

    nested_used_keys = {"portability": GPT4_PORTABILITY_KEYS}

    def matches(self, raw: Mapping[str, Any]) -> bool:
        """Detect the MEND-format keys ``src`` and ``alt``."""
        return "src" in raw and "alt" in raw

    def build(self, rec: RawRecord, source: str) -> EditRecord:
        """Normalise one ZsRE record (see the class docstring for the mapping)."""
        prompt = rec.text("src")
        target_new = rec.text("alt")
        subject = rec.text("subject")
        rec.check_subject(subject, "subject", prompt, "src")
        rephrase = rec.text("rephrase")
        ground_truth = rec.answers("answers")
        meta = rec.extras(self.used_keys)
        locality: dict[str, tuple[QAPair, ...]] = {}
        if rec.has("loc") or rec.has("loc_ans"):
            nq = rec.pair("loc", "loc_ans")
            if nq is not None:
                locality["nq"] = (nq,)
                meta["loc_prompt"] = f"{nq.prompt} {nq.answer}"
        portability: dict[str, tuple[QAPair, ...]] = {}
        gpt4_portability(rec, portability, meta)
        replaced = subject_replace(rec, subject, prompt, target_new)
        if replaced:
            portability["subject_replace"] = replaced
        inverse = rec.optional_text("inverse question")
        if inverse is not None:
            portability["inverse_relation"] = (QAPair(inverse, subject),)
        return EditRecord(
            prompt=prompt,
            target_new=target_new,
            ground_truth=ground_truth,
            subject=subject,
            rephrase_prompts=(rephrase,),
            locality=locality,
            portability=portability,
            source=source,
            index=rec.index,
            meta=meta,
        )
