"""CounterFact in its two record formats: EasyEdit's flat one and ROME's original one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from lit_edit.data.base import RecordReader
from lit_edit.data.fields import RawRecord
from lit_edit.data.zsre import GPT4_PORTABILITY_KEYS, gpt4_portability, subject_replace
from lit_edit.records import EditRecord, QAPair, RecordError


class CounterFactReader(RecordReader):
    """CounterFact, flat EasyEdit format (``counterfact-{train,val,edit}.json``).

    Fields ``{case_id, prompt, target_new, subject, ground_truth, rephrase_prompt,
    locality_prompt, locality_ground_truth}``. Mapping: ``prompt``, ``target_new`` and
    ``subject`` as is; ``ground_truth`` → ``ground_truth`` (normalised);
    ``rephrase_prompt`` → ``rephrase_prompts = (rephrase_prompt,)``;
    ``locality_prompt``/``locality_ground_truth`` → ``locality["neighborhood"]`` (absent in
    the portability variants: no locality); ``portability`` (GPT-4 One Hop) →
    ``portability["one_hop"]``; ``alternative_subject`` → ``portability["subject_replace"]``
    (the prompt asked with it, answered ``target_new``); ``case_id`` and any other field →
    ``meta`` verbatim.
    """

    format_name = "counterfact"
    description = "CounterFact, flat EasyEdit format (prompt, target_new, ground_truth, locality_*)"
    used_keys = frozenset(
        (
            "case_id",
            "prompt",
            "target_new",
            "subject",
            "rephrase_prompt",
            "ground_truth",
            "locality_prompt",
            "locality_ground_truth",
            "portability",
            "alternative_subject",
        )
    )

    nested_used_keys = {"portability": GPT4_PORTABILITY_KEYS}

    def matches(self, raw: Mapping[str, Any]) -> bool:
        """Detect a flat record with a ``ground_truth`` and a CounterFact field.

        The CounterFact fields: ``locality_prompt``, or, in the portability variants that have
        no locality, ``alternative_subject`` or the GPT-4 ``portability`` object (``New
        Question``/``New Answer``, where KnowEdit has named groups).
        """
        keys = ("prompt", "target_new", "ground_truth")
        if not all(k in raw for k in keys) or "src" in raw or "requested_rewrite" in raw:
            return False
        portability = raw.get("portability")
        gpt4 = isinstance(portability, Mapping) and bool(
            {"New Question", "New Answer"} & set(portability)
        )
        return "locality_prompt" in raw or "alternative_subject" in raw or gpt4

    def build(self, rec: RawRecord, source: str) -> EditRecord:
        """Normalise one flat CounterFact record."""
        prompt = rec.text("prompt")
        target_new = rec.text("target_new")
        subject = rec.text("subject")
        rec.check_subject(subject, "subject", prompt, "prompt")
        rephrase = rec.text("rephrase_prompt")
        ground_truth = rec.answers("ground_truth")
        neighborhood = None
        if rec.has("locality_prompt") or rec.has("locality_ground_truth"):
            neighborhood = rec.pair("locality_prompt", "locality_ground_truth")
        meta = rec.extras(self.used_keys - {"case_id"})
        portability: dict[str, tuple[QAPair, ...]] = {}
        gpt4_portability(rec, portability, meta)
        replaced = subject_replace(rec, subject, prompt, target_new)
        if replaced:
            portability["subject_replace"] = replaced
        return EditRecord(
            prompt=prompt,
            target_new=target_new,
            ground_truth=ground_truth,
            subject=subject,
            rephrase_prompts=(rephrase,),
            locality={"neighborhood": (neighborhood,)} if neighborhood is not None else {},
            portability=portability,
            source=source,
            index=rec.index,
            meta=meta,
        )


class RomeCounterFactReader(RecordReader):
    """CounterFact, ROME format (``counterfact.json``, ``multi_counterfact.json``, ...).

    Mapping (ROME ``dsets/counterfact.py``):

    * ``requested_rewrite.prompt.format(subject)`` → ``prompt``;
      ``requested_rewrite.subject`` → ``subject``;
      ``requested_rewrite.target_new.str`` → ``target_new``;
      ``requested_rewrite.target_true.str`` → ``ground_truth``;
    * ``paraphrase_prompts`` → ``rephrase_prompts``;
    * ``neighborhood_prompts`` → ``locality["neighborhood"]``, each answered with ``target_true``
      (absent in portability variants: no locality);
    * the distracting-neighbourhood prompts (``distracting_neighborhood_prompts`` or
      ``dneighborhood_prompts``: neighbourhood prompts preceded by the edit, CounterFact+) →
      ``locality["distracting"]``, each answered with ``target_true``;
    * ``portability`` (GPT-4 One Hop, ``{Recalled Relation, New Question, New Answer}``) →
      ``portability["one_hop"]`` and ``meta["recalled_relation"]``;
    * ``alternative_subject`` (Subject Replace) → ``portability["subject_replace"] =
      (QAPair(prompt with the alternative subject in the slot, target_new),)``;
    * ``generation_prompts`` → ``generation_prompts``;
    * ``meta``: ``relation_id``, ``target_new_id``, ``target_true_id``, ``attribute_prompts``
      (a list; not scored, so reported as unused), and every other top-level field verbatim
      (``case_id``, ``pararel_idx``, ...).
    """

    format_name = "counterfact_rome"
    description = "CounterFact, ROME format (requested_rewrite, paraphrase/neighborhood prompts)"
    distracting_keys: ClassVar[tuple[str, ...]] = (
        "distracting_neighborhood_prompts",
        "dneighborhood_prompts",
    )
    """Names under which files give the distracting-neighbourhood prompts."""
    used_keys = frozenset(
        (
            "case_id",
            "pararel_idx",
            "requested_rewrite",
            "paraphrase_prompts",
            "neighborhood_prompts",
            "generation_prompts",
            "portability",
            "alternative_subject",
            *distracting_keys,
        )
    )

    nested_used_keys = {
        "requested_rewrite": frozenset(
            ("prompt", "subject", "target_new", "target_true", "relation_id")
        ),
        "requested_rewrite.target_new": frozenset(("str", "id")),
        "requested_rewrite.target_true": frozenset(("str", "id")),
        "portability": GPT4_PORTABILITY_KEYS,
    }

    def matches(self, raw: Mapping[str, Any]) -> bool:
        """Detect ROME's ``requested_rewrite`` key."""
        return "requested_rewrite" in raw

    def build(self, rec: RawRecord, source: str) -> EditRecord:
        """Normalise one ROME-format CounterFact record."""
        rewrite = rec.child("requested_rewrite")
        template = rewrite.text("prompt")
        subject = rewrite.text("subject")
        if template.count("{}") != 1:
            raise RecordError(
                rewrite.path("prompt"),
                f"expected exactly one '{{}}' subject slot, got {template!r}",
            )
        prompt = template.replace("{}", subject)
        new = rewrite.child("target_new")
        true = rewrite.child("target_true")
        target_new = new.text("str")
        target_true = true.text("str")
        neighborhood = tuple(
            QAPair(p, target_true)
            for p in rec.text_list("neighborhood_prompts", required=False)
        )
        distracting = tuple(
            QAPair(p, target_true)
            for key in self.distracting_keys
            for p in rec.text_list(key, required=False)
        )
        locality: dict[str, tuple[QAPair, ...]] = {}
        if neighborhood:
            locality["neighborhood"] = neighborhood
        if distracting:
            locality["distracting"] = distracting
        meta: dict[str, Any] = {
            "relation_id": rewrite.raw.get("relation_id"),
            "target_new_id": new.raw.get("id"),
            "target_true_id": true.raw.get("id"),
            "attribute_prompts": list(rec.text_list("attribute_prompts", required=False)),
        }
        meta.update(
            rec.extras((self.used_keys | {"attribute_prompts"}) - {"case_id", "pararel_idx"})
        )
        portability: dict[str, tuple[QAPair, ...]] = {}
        gpt4_portability(rec, portability, meta)
        replaced = subject_replace(rec, subject, prompt, target_new)
        if replaced:
            portability["subject_replace"] = replaced
        return EditRecord(
            prompt=prompt,
            target_new=target_new,
            ground_truth=(target_true,),
            subject=subject,
            rephrase_prompts=rec.text_list("paraphrase_prompts"),
            locality=locality,
            portability=portability,
            generation_prompts=rec.text_list("generation_prompts", required=False),
            source=source,
            index=rec.index,
            meta=meta,
        )
