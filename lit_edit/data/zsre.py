"""ZsRE in the MEND format (``zsre_mend_*.json``), with or without GPT-4 ``portability``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lit_edit.data.base import RecordReader
from lit_edit.data.fields import RawRecord
from lit_edit.records import EditRecord, QAPair


class ZsreReader(RecordReader):
    """ZsRE, MEND format: ``{subject, src, rephrase, alt, answers, loc, loc_ans, pred?, cond?}``.

    Mapping (EasyEdit ``ZsreDataset``):

    * ``src`` → ``prompt``; ``alt`` → ``target_new``; ``answers`` → ``ground_truth``
      (normalised, first answer scored); ``subject`` → ``subject``;
    * ``rephrase`` → ``rephrase_prompts = (rephrase,)``;
    * ``loc``/``loc_ans`` → ``locality["nq"] = (QAPair(loc, loc_ans),)``, keeping the
      ``"nq question: "`` prefix as EasyEdit does;
    * ``portability`` (eval slice) → ``portability["one_hop"] = (QAPair(New Question,
      New Answer),)``, its ``Recalled Relation`` → ``meta["recalled_relation"]``;
    * ``meta["loc_prompt"] = loc + " " + loc_ans`` (WISE's irrelevant training sentence);
      other fields (``cond``, ``pred``, ...) are kept verbatim in ``meta``.

    An empty ``alt`` (two records of ``zsre_mend_train-1k.json``) makes the record invalid, as
    EasyEdit drops such records.
    """

    format_name = "zsre"
    description = "ZsRE, MEND format (src, alt, answers, rephrase, loc, loc_ans[, portability])"

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
        meta = rec.extras(
            ("src", "alt", "subject", "rephrase", "answers", "loc", "loc_ans", "portability")
        )
        locality: dict[str, tuple[QAPair, ...]] = {}
        nq = rec.pair("loc", "loc_ans")
        if nq is not None:
            locality["nq"] = (nq,)
            meta["loc_prompt"] = f"{nq.prompt} {nq.answer}"
        portability: dict[str, tuple[QAPair, ...]] = {}
        if rec.has("portability"):
            port = rec.child("portability")
            one_hop = port.pair("New Question", "New Answer")
            if one_hop is not None:
                portability["one_hop"] = (one_hop,)
            recalled = port.optional_text("Recalled Relation")
            if recalled is not None:
                meta["recalled_relation"] = recalled
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
