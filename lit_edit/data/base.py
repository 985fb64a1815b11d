"""The reader abstraction: one class per source format, chosen by the keys of a raw record."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
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

    def unused_keys(self, raw: Mapping[str, Any]) -> list[str]:
        """The top-level keys of ``raw`` this reader does not use (kept verbatim in ``meta``).

        Args:
            raw: A decoded JSON object.

        Returns:
            The keys, in the record's order.
        """
        return [str(k) for k in raw if k not in self.used_keys]

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
