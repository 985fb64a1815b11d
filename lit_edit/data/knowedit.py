"""KnowEdit (``ZsRE-test-all.json``, ``wiki_counterfact``, ``wiki_recent``, ...)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lit_edit.data.base import RecordReader
from lit_edit.data.counterfact import CounterFactReader
from lit_edit.data.fields import RawRecord, json_type
from lit_edit.records import EditRecord, QAPair, RecordError

GROUP_ITEM_KEYS = {
    "portability.*": frozenset(("prompt", "ground_truth")),
    "locality.*": frozenset(("prompt", "ground_truth")),
}
"""The keys read from each item of a KnowEdit ``portability``/``locality`` group."""


class KnowEditReader(RecordReader):
    """KnowEdit records, with ``portability``/``locality`` groups of (prompt, ground_truth).

    Fields: ``{subject, prompt, target_new, ground_truth, rephrase_prompt?, portability?,
    locality?}``, the groups as ``{GROUP: [{prompt, ground_truth}]}``.

    Mapping: ``prompt``, ``target_new``, ``subject`` as is; ``ground_truth`` (a string, a list of
    strings or a list of alias lists) → ``ground_truth`` normalised (first answer scored, the
    others aliases); ``rephrase_prompt`` → ``rephrase_prompts``; each ``portability``/``locality``
    group → a group of the same name (the file's key, e.g. ``"Reasoning"``,
    ``"Relation_Specificity"``) of :class:`~lit_edit.records.QAPair` whose answer is the first
    normalised ground truth and whose aliases are the rest. A group given as a single object
    instead of a list is read as a one-item list. Other fields (``cond``, ...) go to ``meta``.

    Empty optional values are dropped with a note: an empty ``ground_truth`` (one record of
    ``train_cf.json``) gives ``ground_truth=()``, a pair with an empty prompt or answer is left
    out of its group (a group left empty is omitted).
    """

    format_name = "knowedit"
    description = "KnowEdit (prompt, target_new, ground_truth, portability/locality groups)"
    used_keys = frozenset(
        (
            "prompt",
            "target_new",
            "subject",
            "rephrase_prompt",
            "ground_truth",
            "portability",
            "locality",
        )
    )

    nested_used_keys = GROUP_ITEM_KEYS

    def matches(self, raw: Mapping[str, Any]) -> bool:
        """Detect ``prompt`` + ``target_new`` without the fields of the flat formats."""
        return (
            "prompt" in raw
            and "target_new" in raw
            and "locality_prompt" not in raw
            and "src" not in raw
            and "requested_rewrite" not in raw
            and not CounterFactReader().matches(raw)
        )

    def build(self, rec: RawRecord, source: str) -> EditRecord:
        """Normalise one KnowEdit record."""
        prompt = rec.text("prompt")
        target_new = rec.text("target_new")
        subject = rec.optional_text("subject")
        rec.check_subject(subject, "subject", prompt, "prompt")
        rephrase = rec.optional_text("rephrase_prompt")
        ground_truth = rec.answers("ground_truth", required_present=False)
        return EditRecord(
            prompt=prompt,
            target_new=target_new,
            ground_truth=ground_truth,
            subject=subject,
            rephrase_prompts=(rephrase,) if rephrase is not None else (),
            locality=self.groups(rec, "locality"),
            portability=self.groups(rec, "portability"),
            source=source,
            index=rec.index,
            meta=rec.extras(self.used_keys),
        )

    @staticmethod
    def groups(rec: RawRecord, key: str) -> dict[str, tuple[QAPair, ...]]:
        """The KnowEdit groups of ``rec[key]`` (``{GROUP: [{prompt, ground_truth}]}``).

        Args:
            rec: The record.
            key: ``"portability"`` or ``"locality"``.

        Returns:
            One tuple of pairs per non-empty group, under the file's group name.

        Raises:
            RecordError: naming the group or item when it has the wrong shape.
        """
        groups: dict[str, tuple[QAPair, ...]] = {}
        for name, items in rec.optional_mapping(key).items():
            path = f"{key}.{name}"
            if items is None:
                continue
            if isinstance(items, Mapping):
                items = [items]
            if not isinstance(items, list):
                raise RecordError(
                    rec.path(path), f"expected a list of objects, got {json_type(items)}"
                )
            pairs: list[QAPair] = []
            for j, item in enumerate(items):
                if not isinstance(item, Mapping):
                    raise RecordError(
                        rec.path(f"{path}[{j}]"), f"expected an object, got {json_type(item)}"
                    )
                entry = RawRecord(item, rec.index, rec.notes, prefix=rec.path(f"{path}[{j}]."))
                pair = entry.pair("prompt", "ground_truth", aliases=True)
                if pair is not None:
                    pairs.append(pair)
            if pairs:
                groups[name] = tuple(pairs)
        return groups


class WikiBioReader(RecordReader):
    """KnowEdit WikiBio: ``{concept, text, labels, locality?, portability?}``.

    Mapping (EasyEdit ``KnowEditDataset``, which reads ``subject``/``prompt``/``target_new``
    from ``concept``/``text``/``labels`` when the former are absent):

    * ``text`` (a biography passage) → ``prompt``; ``labels`` (the sentence to produce next) →
      ``target_new``; no ``ground_truth`` (WikiBio edits are hallucination corrections);
    * ``concept`` → ``subject`` when it occurs in ``text``; otherwise ``subject`` is ``None``, the
      concept is kept as ``meta["concept"]`` and a note says so;
    * each ``locality`` group (``Relation_Specificity``, ``Forgetfulness``) and ``portability``
      group → a group of the same name, read as in :class:`KnowEditReader`.
    """

    format_name = "wikibio"
    description = "KnowEdit WikiBio (concept, text, labels, locality groups)"
    used_keys = frozenset(("concept", "text", "labels", "locality", "portability"))

    nested_used_keys = GROUP_ITEM_KEYS

    def matches(self, raw: Mapping[str, Any]) -> bool:
        """Detect WikiBio's ``text`` + ``labels`` (and no ``prompt``)."""
        return "text" in raw and "labels" in raw and "prompt" not in raw

    def build(self, rec: RawRecord, source: str) -> EditRecord:
        """Normalise one WikiBio record."""
        prompt = rec.text("text")
        target_new = rec.text("labels")
        concept = rec.optional_text("concept")
        meta = rec.extras(self.used_keys)
        subject = concept
        if concept is not None and concept not in prompt:
            rec.note("concept", "does not occur in 'text'; kept as meta['concept'], no subject")
            meta["concept"] = concept
            subject = None
        return EditRecord(
            prompt=prompt,
            target_new=target_new,
            subject=subject,
            locality=KnowEditReader.groups(rec, "locality"),
            portability=KnowEditReader.groups(rec, "portability"),
            source=source,
            index=rec.index,
            meta=meta,
        )
