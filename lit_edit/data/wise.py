"""WISE's flat edit files (``hallucination-{edit,train}.json``, and the like)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lit_edit.data.base import RecordReader
from lit_edit.data.fields import RawRecord
from lit_edit.records import EditRecord


class WiseReader(RecordReader):
    """WISE's flat edit format (hallucination and the like), without a ``ground_truth``.

    Fields: ``{prompt, target_new, subject, locality_prompt, locality_ground_truth,
    rephrase_prompt?}`` (the hallucination edits are scored by perplexity, so there is no
    original answer).

    Mapping: ``prompt`` (a passage), ``target_new`` (its next sentence) and ``subject`` as is;
    ``locality_prompt``/``locality_ground_truth`` → ``locality["neighborhood"]`` (dropped with a
    note when the answer is empty, as in 12 hallucination records); ``rephrase_prompt`` when
    present → ``rephrase_prompts``; the temporal files' ``ood_rephrase`` (an out-of-distribution
    rephrase, WISE's generalization prompt for them) → ``rephrase_prompts`` after
    ``rephrase_prompt``, so it is scored as generalization, with ``rephrase_kinds``
    ``("rephrase", "ood")``: the breakdown shows ``generalization/ood`` (and
    ``generalization/rephrase``) on its own; other fields → ``meta`` verbatim.
    """

    format_name = "wise"
    description = "WISE flat format, e.g. hallucination, temporal (prompt, target_new, locality_*)"
    used_keys = frozenset(
        (
            "prompt",
            "target_new",
            "subject",
            "rephrase_prompt",
            "ood_rephrase",
            "locality_prompt",
            "locality_ground_truth",
        )
    )

    def matches(self, raw: Mapping[str, Any]) -> bool:
        """Detect a flat record with a ``locality_prompt`` and no ``ground_truth``."""
        keys = ("prompt", "target_new", "locality_prompt")
        return all(k in raw for k in keys) and "ground_truth" not in raw and "src" not in raw

    def build(self, rec: RawRecord, source: str) -> EditRecord:
        """Normalise one WISE record."""
        prompt = rec.text("prompt")
        target_new = rec.text("target_new")
        subject = rec.text("subject")
        rec.check_subject(subject, "subject", prompt, "prompt")
        given = (
            ("rephrase", rec.optional_text("rephrase_prompt")),
            ("ood", rec.optional_text("ood_rephrase")),
        )
        kinds = tuple(kind for kind, text in given if text is not None)
        rephrases = tuple(text for _, text in given if text is not None)
        neighborhood = rec.pair("locality_prompt", "locality_ground_truth")
        return EditRecord(
            prompt=prompt,
            target_new=target_new,
            subject=subject,
            rephrase_prompts=rephrases,
            rephrase_kinds=kinds if "ood" in kinds else (),
            locality={"neighborhood": (neighborhood,)} if neighborhood is not None else {},
            source=source,
            index=rec.index,
            meta=rec.extras(self.used_keys),
        )
