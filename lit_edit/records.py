"""The one record type every data source is normalised into, and its validation errors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class RecordError(ValueError):
    """A record-level validation failure, naming the offending field.

    Readers catch it and re-raise it as :class:`DataFileError` with the file and record index.

    Args:
        field: Name of the offending field (as named in the source file where possible).
        message: What is wrong with it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field '{field}': {message}")
        self.field = field
        self.message = message


class DataFileError(ValueError):
    """A data-file error naming the file, the record index and the field.

    Args:
        path: The file being read.
        message: What is wrong.
        index: Index of the record in the file (``None`` for file-level errors).
        field: Name of the offending field (``None`` for file- or record-level errors).
    """

    def __init__(
        self, path: str, message: str, index: int | None = None, field: str | None = None
    ) -> None:
        where = str(path)
        if index is not None:
            where += f": record {index}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.index = index
        self.field = field
        self.message = message


@dataclass(frozen=True)
class QAPair:
    """A prompt with the answer expected after it.

    Attributes:
        prompt: The text the model is conditioned on.
        answer: The scored answer (joined to the prompt as ``prompt + " " + answer``).
        aliases: Other answers accepted as correct (e.g. for exact-match metrics).
    """

    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {"prompt": self.prompt, "answer": self.answer, "aliases": list(self.aliases)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QAPair:
        """Build from the output of :meth:`to_dict`."""
        return cls(str(data["prompt"]), str(data["answer"]), tuple(data.get("aliases", ())))


def _check_text(value: Any, name: str, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise RecordError(name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(name, "is empty")


@dataclass(frozen=True)
class EditRecord:
    """One edit request with everything needed to score it, whatever its source.

    Attributes:
        prompt: The edit prompt (question or sentence prefix), e.g. ``"The capital of X is"``.
        target_new: The new answer the edit must produce.
        ground_truth: The original answer(s): the first is the scored one, the rest are aliases.
            Empty when the source does not give it.
        subject: The edited subject; when given it must occur in ``prompt``.
        rephrase_prompts: Paraphrases of ``prompt`` (scored with ``target_new``: generalization).
        rephrase_kinds: The kind of each rephrase prompt (e.g. ``("rephrase", "ood")`` for WISE
            temporal's in-distribution and out-of-distribution rephrases): each kind becomes a
            ``generalization/<kind>`` group of the breakdown. Empty: one unnamed group.
        locality: Named groups of unrelated (prompt, answer) pairs whose predictions must not
            change (e.g. ``{"neighborhood": (...)}``).
        portability: Named groups of (prompt, answer) pairs whose answers follow from the edit
            (e.g. ``{"two_hop": (...), "subject_aliasing": (...)}``).
        generation_prompts: Prompts for free generation (fluency).
        source: Name or path of the source the record came from.
        index: Index of the record in its source file (``-1`` when not from a file).
        meta: Source-specific extras kept verbatim (e.g. ``case_id``, ``cond``, ``loc_prompt``).
    """

    prompt: str
    target_new: str
    ground_truth: tuple[str, ...] = ()
    subject: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    rephrase_kinds: tuple[str, ...] = ()
    locality: Mapping[str, tuple[QAPair, ...]] = field(default_factory=dict)
    portability: Mapping[str, tuple[QAPair, ...]] = field(default_factory=dict)
    generation_prompts: tuple[str, ...] = ()
    source: str = ""
    index: int = -1
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the record's invariants.

        Raises:
            RecordError: naming the first offending field.
        """
        _check_text(self.prompt, "prompt")
        _check_text(self.target_new, "target_new")
        for i, gt in enumerate(self.ground_truth):
            _check_text(gt, f"ground_truth[{i}]")
        if self.subject is not None:
            _check_text(self.subject, "subject")
            if self.subject not in self.prompt:
                raise RecordError(
                    "subject", f"subject {self.subject!r} does not occur in prompt {self.prompt!r}"
                )
        for i, text in enumerate(self.rephrase_prompts):
            _check_text(text, f"rephrase_prompts[{i}]")
        if self.rephrase_kinds and len(self.rephrase_kinds) != len(self.rephrase_prompts):
            raise RecordError(
                "rephrase_kinds",
                f"{len(self.rephrase_kinds)} kinds for {len(self.rephrase_prompts)} rephrase "
                "prompts (one kind per prompt, or none)",
            )
        for i, kind in enumerate(self.rephrase_kinds):
            _check_text(kind, f"rephrase_kinds[{i}]")
        for i, text in enumerate(self.generation_prompts):
            _check_text(text, f"generation_prompts[{i}]")
        for group_name, groups in (("locality", self.locality), ("portability", self.portability)):
            for key, pairs in groups.items():
                for i, pair in enumerate(pairs):
                    if not isinstance(pair, QAPair):
                        raise RecordError(f"{group_name}.{key}[{i}]", "expected a QAPair")
                    _check_text(pair.prompt, f"{group_name}.{key}[{i}].prompt")
                    _check_text(pair.answer, f"{group_name}.{key}[{i}].answer")

    @property
    def edit_pair(self) -> QAPair:
        """The edit itself as a (prompt, target_new) pair."""
        return QAPair(self.prompt, self.target_new)

    @property
    def rephrase_pairs(self) -> tuple[QAPair, ...]:
        """The rephrase prompts, each paired with ``target_new``."""
        return tuple(QAPair(p, self.target_new) for p in self.rephrase_prompts)

    @property
    def fact(self) -> str:
        """The new fact as a sentence: ``prompt + " " + target_new``."""
        return f"{self.prompt} {self.target_new}"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        return {
            "prompt": self.prompt,
            "target_new": self.target_new,
            "ground_truth": list(self.ground_truth),
            "subject": self.subject,
            "rephrase_prompts": list(self.rephrase_prompts),
            "rephrase_kinds": list(self.rephrase_kinds),
            "locality": {k: [p.to_dict() for p in v] for k, v in self.locality.items()},
            "portability": {k: [p.to_dict() for p in v] for k, v in self.portability.items()},
            "generation_prompts": list(self.generation_prompts),
            "source": self.source,
            "index": self.index,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditRecord:
        """Build a record from the output of :meth:`to_dict`."""

        def groups(raw: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, tuple[QAPair, ...]]:
            """Named lists of pairs from their dict form."""
            return {k: tuple(QAPair.from_dict(p) for p in v) for k, v in raw.items()}

        return cls(
            prompt=data["prompt"],
            target_new=data["target_new"],
            ground_truth=tuple(data.get("ground_truth", ())),
            subject=data.get("subject"),
            rephrase_prompts=tuple(data.get("rephrase_prompts", ())),
            rephrase_kinds=tuple(data.get("rephrase_kinds", ())),
            locality=groups(data.get("locality", {})),
            portability=groups(data.get("portability", {})),
            generation_prompts=tuple(data.get("generation_prompts", ())),
            source=data.get("source", ""),
            index=int(data.get("index", -1)),
            meta=dict(data.get("meta", {})),
        )


def normalise_answers(value: Any, field_name: str) -> tuple[str, ...]:
    """Normalise a ground truth given as a string, a list of strings or a list of alias lists.

    The first answer (the first alias of the first list) is the scored one; the others, in order
    and without duplicates, are accepted aliases.

    Args:
        value: ``"a"``, ``["a", "b"]`` or ``[["a", "a2"], ["b"]]``.
        field_name: Field name used in the error message.

    Returns:
        The answers, scored one first.

    Raises:
        RecordError: if the value has another shape, holds a non-string or is empty.
    """
    flat: list[str] = []

    def add(item: Any, depth: int) -> None:
        """Collect non-empty strings of ``item``, flattening up to two list levels."""
        if isinstance(item, str):
            if item.strip() and item not in flat:
                flat.append(item)
        elif isinstance(item, list) and depth < 2:
            for sub in item:
                add(sub, depth + 1)
        else:
            raise RecordError(
                field_name,
                f"expected a string, a list of strings or a list of alias lists, got {value!r}",
            )

    add(value, 0)
    if not flat:
        raise RecordError(field_name, "is empty")
    return tuple(flat)


def count_pairs(records: Iterable[EditRecord]) -> dict[str, int]:
    """Count the scored pairs of each kind over ``records`` (for logs and summaries)."""
    counts = {"edit": 0, "rephrase": 0, "locality": 0, "portability": 0}
    for r in records:
        counts["edit"] += 1
        counts["rephrase"] += len(r.rephrase_prompts)
        counts["locality"] += sum(len(v) for v in r.locality.values())
        counts["portability"] += sum(len(v) for v in r.portability.values())
    return counts
