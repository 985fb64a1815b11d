"""Typed access to the fields of one raw record, with errors that name the source file's field.

Readers never index raw dicts directly: they go through :class:`RawRecord`, whose accessors check
presence and type and raise :class:`~lit_edit.records.RecordError` naming the field as it is
spelled in the file (nested fields as dotted paths, list items with ``[i]``, e.g.
``requested_rewrite.target_new.str`` or ``locality.Relation_Specificity[0].ground_truth``).

Two kinds of problem are distinguished:

* a **missing required field or a wrong type** makes the record invalid (``RecordError``);
* an **empty optional value** (an empty locality answer, an empty original answer) is not an
  error: the value is dropped and a :class:`ReadNote` is recorded, so nothing disappears silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lit_edit.records import QAPair, RecordError, normalise_answers


@dataclass(frozen=True)
class ReadNote:
    """A non-fatal observation about one record: an empty optional value that was dropped.

    Attributes:
        index: Index of the record in its file.
        field: The source file's name of the field.
        message: What was dropped and why.
    """

    index: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"record {self.index}, field '{self.field}': {self.message}"


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type (``object``, ``list``, ``string``, ``number``...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def is_blank(value: Any) -> bool:
    """Whether a text or (nested) list of texts holds no non-whitespace text at all."""
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return all(is_blank(v) for v in value)
    return False


class RawRecord:
    """One raw JSON object being parsed, with its index, field-path prefix and note sink.

    Args:
        raw: The decoded JSON object.
        index: Index of the record in its file.
        notes: List that receives a :class:`ReadNote` for every dropped empty optional value.
        prefix: Path of this object inside the top-level record (``""`` for the record itself,
            ``"requested_rewrite."`` for a nested object).
    """

    def __init__(
        self, raw: Mapping[str, Any], index: int, notes: list[ReadNote], prefix: str = ""
    ) -> None:
        self.raw = raw
        self.index = index
        self.notes = notes
        self.prefix = prefix

    def path(self, key: str) -> str:
        """The full source-field path of ``key``."""
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        """Whether ``key`` is present and not null."""
        return self.raw.get(key) is not None

    def note(self, key: str, message: str) -> None:
        """Record that the value of ``key`` was dropped (see :class:`ReadNote`)."""
        self.notes.append(ReadNote(self.index, self.path(key), message))

    def _get(self, key: str) -> Any:
        if key not in self.raw:
            raise RecordError(self.path(key), "is missing")
        return self.raw[key]

    def text(self, key: str) -> str:
        """A required, non-empty string.

        Raises:
            RecordError: if it is missing, not a string or empty.
        """
        value = self._get(key)
        if not isinstance(value, str):
            raise RecordError(self.path(key), f"expected a string, got {json_type(value)}")
        if not value.strip():
            raise RecordError(self.path(key), "is empty")
        return value

    def optional_text(self, key: str) -> str | None:
        """An optional string: ``None`` when absent or null; dropped with a note when empty.

        Raises:
            RecordError: if it is present with another type.
        """
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise RecordError(self.path(key), f"expected a string, got {json_type(value)}")
        if not value.strip():
            self.note(key, "is empty; dropped")
            return None
        return value

    def text_list(self, key: str, *, required: bool = True) -> tuple[str, ...]:
        """A list of strings; empty items are dropped with a note.

        Args:
            key: Field name.
            required: When false an absent or null field gives ``()``.

        Raises:
            RecordError: if a required list is missing, or the value is not a list of strings.
        """
        if not required and self.raw.get(key) is None:
            return ()
        value = self._get(key)
        if not isinstance(value, list):
            raise RecordError(self.path(key), f"expected a list of strings, got {json_type(value)}")
        out: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise RecordError(
                    self.path(f"{key}[{i}]"), f"expected a string, got {json_type(item)}"
                )
            if item.strip():
                out.append(item)
            else:
                self.note(f"{key}[{i}]", "is empty; dropped")
        return tuple(out)

    def answers(self, key: str, *, required_present: bool = True) -> tuple[str, ...]:
        """Answers given as a string, a list of strings or a list of alias lists.

        The first answer is the scored one, the rest are aliases (see
        :func:`~lit_edit.records.normalise_answers`). An empty value gives ``()`` with a note.

        Args:
            key: Field name.
            required_present: When true a missing field is an error; otherwise it gives ``()``.

        Raises:
            RecordError: if the field is missing (when required) or has another shape.
        """
        if not required_present and self.raw.get(key) is None:
            return ()
        value = self._get(key)
        if is_blank(value):
            self.note(key, "is empty; no answer kept")
            return ()
        return normalise_answers(value, self.path(key))

    def child(self, key: str) -> RawRecord:
        """A required nested object, as a :class:`RawRecord` with the nested path prefix.

        Raises:
            RecordError: if it is missing or not an object.
        """
        value = self._get(key)
        if not isinstance(value, Mapping):
            raise RecordError(self.path(key), f"expected an object, got {json_type(value)}")
        return RawRecord(value, self.index, self.notes, prefix=f"{self.path(key)}.")

    def optional_mapping(self, key: str) -> Mapping[str, Any]:
        """An optional object (``{}`` when absent or null).

        Raises:
            RecordError: if it is present and not an object.
        """
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise RecordError(self.path(key), f"expected an object, got {json_type(value)}")
        return value

    def pair(self, prompt_key: str, answer_key: str, *, aliases: bool = False) -> QAPair | None:
        """A (prompt, answer) pair from two required fields of this object.

        Args:
            prompt_key: Field holding the prompt.
            answer_key: Field holding the answer (a string, or any answers shape when
                ``aliases`` is true; its first answer is scored, the rest become aliases).
            aliases: Whether the answer may be a list of answers/aliases.

        Returns:
            The pair, or ``None`` (with a note) when the prompt or the answer is empty.

        Raises:
            RecordError: if a field is missing or has the wrong type.
        """
        prompt = self._get(prompt_key)
        if not isinstance(prompt, str):
            raise RecordError(self.path(prompt_key), f"expected a string, got {json_type(prompt)}")
        value = self._get(answer_key)
        if not aliases and not isinstance(value, str):
            raise RecordError(self.path(answer_key), f"expected a string, got {json_type(value)}")
        if is_blank(value):
            self.note(answer_key, "is empty; pair dropped")
            return None
        answers = normalise_answers(value, self.path(answer_key))
        if not prompt.strip():
            self.note(prompt_key, "is empty; pair dropped")
            return None
        return QAPair(prompt, answers[0], tuple(answers[1:]))

    def check_subject(
        self, subject: str | None, subject_key: str, prompt: str, prompt_key: str
    ) -> None:
        """Check that the subject occurs in the prompt.

        Raises:
            RecordError: naming ``subject_key`` when it does not.
        """
        if subject is not None and subject not in prompt:
            raise RecordError(
                self.path(subject_key),
                f"subject {subject!r} does not occur in {self.path(prompt_key)} {prompt!r}",
            )

    def extras(self, consumed: Iterable[str]) -> dict[str, Any]:
        """The fields not in ``consumed``, verbatim (kept in ``EditRecord.meta``)."""
        used = set(consumed)
        return {k: v for k, v in self.raw.items() if k not in used}
