"""The reader abstraction: one class per source format, chosen by the keys of a raw record."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Generic, TypeVar

from lit_edit.data.fields import RawRecord, ReadNote
from lit_edit.records import EditRecord

T = TypeVar("T")


class BaseReader(ABC, Generic[T]):
    """Reads the raw records of one file format into typed items.

    Subclasses set :attr:`format_name` and :attr:`description` and implement :meth:`matches`
    (used for format detection from a file's first record) and :meth:`parse_items`. Readers are
    stateless; the list of known readers comes from
    :func:`lit_edit.data.detect.available_readers`.
    """

    format_name: ClassVar[str]
    """Name of the format, as given to ``format=`` / ``--format``."""

    description: ClassVar[str]
    """One line describing the format (shown by the check command)."""

    used_keys: ClassVar[frozenset[str]] = frozenset()
    """Top-level keys the format maps to a record field or identifier; any other is unused."""

    nested_used_keys: ClassVar[Mapping[str, frozenset[str]]] = {}
    """The keys the format uses inside its nested objects, by dotted path of the object.

    ``"*"`` in a path stands for every key of an object (e.g. KnowEdit's group names,
    ``"locality.*"``); a list on the way stands for each of its items.
    """

    def unused_keys(self, raw: Mapping[str, Any]) -> list[str]:
        """The top-level keys of ``raw`` this reader does not use (kept verbatim in ``meta``).

        Args:
            raw: A decoded JSON object.

        Returns:
            The keys, in the record's order.
        """
        return [str(k) for k in raw if k not in self.used_keys]

    def unused_nested_keys(self, raw: Mapping[str, Any]) -> list[str]:
        """The keys inside the nested objects of ``raw`` that this reader does not use.

        Args:
            raw: A decoded JSON object.

        Returns:
            Each unused key once, as a dotted path (``"requested_rewrite.relation"``,
            ``"locality.Forgetfulness.subject"``): such values are not read and not kept.
        """
        found: dict[str, None] = {}
        for path, used in self.nested_used_keys.items():
            for where, obj in objects_at(raw, path.split(".")):
                found.update((f"{where}.{k}", None) for k in obj if k not in used)
        return list(found)

    @abstractmethod
    def matches(self, raw: Mapping[str, Any]) -> bool:
        """Whether a raw record has this format's keys (format detection).

        Args:
            raw: A decoded JSON object.
        """

    @abstractmethod
    def parse_items(
        self, raw: Mapping[str, Any], index: int, source: str, notes: list[ReadNote]
    ) -> list[T]:
        """Parse one raw record into zero or more items.

        Args:
            raw: The decoded JSON object.
            index: Its index in the file.
            source: The file path (kept in each item).
            notes: Receives a :class:`ReadNote` for every dropped empty optional value.

        Raises:
            RecordError: naming the source file's field when the record is invalid.
        """


class RecordReader(BaseReader[EditRecord]):
    """A reader whose every raw record becomes one :class:`~lit_edit.records.EditRecord`."""

    def parse_items(
        self, raw: Mapping[str, Any], index: int, source: str, notes: list[ReadNote]
    ) -> list[EditRecord]:
        """Parse one raw record (see :meth:`parse`)."""
        return [self.parse(raw, index, source, notes)]

    def parse(
        self,
        raw: Mapping[str, Any],
        index: int,
        source: str = "",
        notes: list[ReadNote] | None = None,
    ) -> EditRecord:
        """Normalise one raw record into an :class:`~lit_edit.records.EditRecord`.

        Args:
            raw: The decoded JSON object.
            index: Its index in the file (kept as ``EditRecord.index``).
            source: The file path (kept as ``EditRecord.source``).
            notes: Receives a :class:`ReadNote` for every dropped empty optional value; when
                ``None`` the notes are discarded (use the file readers to get them reported).

        Returns:
            The normalised record.

        Raises:
            RecordError: naming the source file's field when the record is invalid.
        """
        return self.build(RawRecord(raw, index, [] if notes is None else notes), source)

    @abstractmethod
    def build(self, rec: RawRecord, source: str) -> EditRecord:
        """Build the record from the field accessor ``rec`` (format-specific part of :meth:`parse`).

        Args:
            rec: Typed access to the raw record's fields.
            source: The file path.
        """


def objects_at(
    value: Any, segments: list[str], where: str = ""
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The JSON objects at a dotted path of ``value``, with their paths (see ``nested_used_keys``).

    Args:
        value: A decoded JSON value.
        segments: The path's keys; ``"*"`` is every key of an object.
        where: The path of ``value`` itself.

    Yields:
        ``(path, object)`` for every object found; a list on the way yields each item's.
    """
    if isinstance(value, list):
        for item in value:
            yield from objects_at(item, segments, where)
        return
    if not isinstance(value, Mapping):
        return
    if not segments:
        yield where, value
        return
    head, rest = segments[0], segments[1:]
    keys = [str(k) for k in value] if head == "*" else [head] if head in value else []
    for key in keys:
        yield from objects_at(value[key], rest, f"{where}.{key}" if where else key)
