"""Reading data files: JSON/JSONL decoding, format detection, validation, skip-and-report.

Every error is a :class:`~lit_edit.records.DataFileError` naming the file, and when it concerns a
record, the record's index and the source file's field name. With ``skip_invalid=True`` invalid
records are left out, and each one is returned in :attr:`ReadResult.skipped` and logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from lit_edit.data.base import BaseReader
from lit_edit.data.detect import available_readers, detect_reader, reader_by_name, record_readers
from lit_edit.data.fields import ReadNote, json_type
from lit_edit.data.lte import ConversationPair, ConversationReader
from lit_edit.records import DataFileError, EditRecord, RecordError

T = TypeVar("T")


@dataclass
class ReadResult(Generic[T]):
    """What reading one file gave.

    Attributes:
        path: The file.
        format_name: The format it was read as (detected or forced).
        records: The valid items, in file order (``EditRecord`` or ``ConversationPair``).
        num_read: Number of raw records read successfully (a conversation may give several
            pairs, so this can differ from ``len(records)``).
        skipped: One error per invalid record left out (only with ``skip_invalid=True``).
        notes: Empty optional values that were dropped from valid records.
        unused_keys: Each top-level key of the valid records that the format does not use (it is
            kept verbatim in ``EditRecord.meta``), with the number of records that have it.
        unused_nested_keys: Each key inside a nested object of the valid records that the
            format does not read (a dotted path, e.g. ``"requested_rewrite.relation"``; not kept),
            with the number of records that have it.
    """

    path: str
    format_name: str
    records: list[T]
    num_read: int
    skipped: list[DataFileError] = field(default_factory=list)
    notes: list[ReadNote] = field(default_factory=list)
    unused_keys: dict[str, int] = field(default_factory=dict)
    unused_nested_keys: dict[str, int] = field(default_factory=dict)

    @property
    def skipped_indices(self) -> list[int]:
        """Indices (in the file) of the records that were skipped as invalid."""
        return [e.index for e in self.skipped if e.index is not None]


def _kind(value: Any) -> str:
    name = json_type(value)
    return name if name == "null" else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def load_raw(path: str | Path) -> list[Any]:
    """Decode a data file: a JSON list of records, or JSON Lines (one record a line).

    The layout is detected from the content, whatever the extension (``.json`` or ``.jsonl``): a
    file holding a single JSON document is that document (a list of records; a ``.jsonl`` file may
    also hold a single object, its one record), a file holding several JSON values is read as JSON
    Lines. Blank lines of a JSON Lines file are ignored; the index of a record is its position
    among the non-blank lines.

    Args:
        path: The file.

    Returns:
        The decoded records (not yet validated).

    Raises:
        DataFileError: if the file is missing or unreadable, is not valid JSON (the message gives
            the line and column), or a single document's top level is not a list.
    """
    p = Path(path)
    if p.is_dir():
        raise DataFileError(str(path), "is a directory, not a data file (.json or .jsonl)")
    if not p.is_file():
        raise DataFileError(str(path), "no such file")
    suffix = p.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise DataFileError(str(path), f"unsupported extension {suffix!r}; use .json or .jsonl")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataFileError(str(path), f"cannot read the file as UTF-8 text: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if suffix == ".jsonl" or e.msg == "Extra data":
            return _json_lines(str(path), text, suffix)
        raise DataFileError(
            str(path), f"line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})"
        ) from e
    if isinstance(data, list):
        return data
    if suffix == ".jsonl" and isinstance(data, Mapping):
        return [data]
    raise DataFileError(
        str(path), f"expected a JSON list of records at the top level, got {_kind(data)}"
    )


def _json_lines(path: str, text: str, suffix: str) -> list[Any]:
    """Decode ``text`` as JSON Lines (one JSON value per non-blank line)."""
    hint = "" if suffix == ".jsonl" else " (read as JSON Lines: the file holds several values)"
    records: list[Any] = []
    # split on "\n" only: JSON strings may legally hold U+2028 and friends
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataFileError(
                path, f"line {lineno}, column {e.colno}: not valid JSON ({e.msg}){hint}"
            ) from e
    return records


def read_file(
    path: str | Path,
    format: str | None = None,
    skip_invalid: bool = False,
    readers: Sequence[BaseReader[Any]] | None = None,
) -> ReadResult[Any]:
    """Read, detect, validate and normalise one data file.

    Args:
        path: A ``.json`` or ``.jsonl`` file.
        format: Force a format by name (e.g. ``"zsre"``); detected from the first JSON object
            record's keys when ``None``.
        skip_invalid: Leave invalid records out (reported in the result and logged) instead of
            failing on the first one.
        readers: Candidate readers (default: :func:`~lit_edit.data.detect.available_readers`).

    Returns:
        The items, the format, and what was skipped or dropped.

    Raises:
        DataFileError: for a file-level problem, an unknown or undetectable format, or (without
            ``skip_invalid``) the first invalid record, naming its index and field.
    """
    source = str(path)
    raws = load_raw(path)
    if not raws:
        raise DataFileError(source, "contains no records")
    candidates = list(available_readers() if readers is None else readers)
    first = next((i for i, r in enumerate(raws) if isinstance(r, Mapping)), None)
    reader = pick_reader(
        source, format, candidates, None if first is None else (first, raws[first])
    )
    result: ReadResult[Any] = ReadResult(source, reader.format_name, [], 0)
    for index, raw in enumerate(raws):
        record_notes: list[ReadNote] = []
        try:
            items = parse_located(reader, raw, index, source, record_notes)
        except DataFileError as error:
            if not skip_invalid:
                raise
            result.skipped.append(error)
            continue
        result.records.extend(items)
        count_valid(result, reader, raw, record_notes)
    log_result(result)
    return result


def pick_reader(
    source: str,
    format: str | None,
    candidates: Sequence[BaseReader[Any]],
    first: tuple[int, Mapping[str, Any]] | None,
) -> BaseReader[Any]:
    """The reader of a file: the one named ``format``, or the one detected from its first object.

    Args:
        source: The file (named in the errors).
        format: A format name, or ``None`` to detect it.
        candidates: The readers to choose from.
        first: The index and value of the file's first record that is a JSON object (``None``
            when there is none).

    Raises:
        DataFileError: for an unknown format, no JSON object record, or an undetectable format.
    """
    if format is not None:
        try:
            return reader_by_name(format, candidates)
        except ValueError as e:
            raise DataFileError(source, str(e)) from e
    if first is None:
        raise DataFileError(source, "no record is a JSON object", index=0)
    index, raw = first
    try:
        return detect_reader(raw, candidates)
    except ValueError as e:
        raise DataFileError(source, _not_detected(raw, candidates, e), index) from e


def parse_located(
    reader: BaseReader[T], raw: Any, index: int, source: str, notes: list[ReadNote]
) -> list[T]:
    """Validate and parse one raw record, its errors located in the file.

    Args:
        reader: The file's reader.
        raw: The decoded record.
        index: Its index in the file.
        source: The file.
        notes: Receives the record's dropped empty optional values.

    Returns:
        The record's items.

    Raises:
        DataFileError: naming the file, the record index and the field.
    """
    if not isinstance(raw, Mapping):
        raise DataFileError(source, f"expected a JSON object, got {_kind(raw)}", index)
    try:
        return reader.parse_items(raw, index, source, notes)
    except RecordError as e:
        raise DataFileError(source, e.message, index, e.field) from e


def count_valid(
    result: ReadResult[Any], reader: BaseReader[Any], raw: Mapping[str, Any],
    notes: list[ReadNote],
) -> None:
    """Add a valid record's notes and unused keys to the file's report.

    Args:
        result: The report being built.
        reader: The file's reader.
        raw: The valid record.
        notes: Its dropped empty optional values.
    """
    result.notes.extend(notes)
    result.num_read += 1
    for key in reader.unused_keys(raw):
        result.unused_keys[key] = result.unused_keys.get(key, 0) + 1
    for key in reader.unused_nested_keys(raw):
        result.unused_nested_keys[key] = result.unused_nested_keys.get(key, 0) + 1


def _not_detected(
    raw: Mapping[str, Any], candidates: Sequence[BaseReader[Any]], error: Exception
) -> str:
    """The detection error, saying which other known format the record has, if any."""
    wanted = [r.format_name for r in candidates]
    other = [r for r in available_readers() if r.format_name not in wanted and r.matches(raw)]
    if not other:
        return str(error)
    return (
        f"the records are in the {other[0].format_name!r} format ({other[0].description}), "
        f"which is not read here (expected: {', '.join(wanted)})"
    )


def _where(error: DataFileError) -> str:
    field = f", field '{error.field}'" if error.field is not None else ""
    return f"record {error.index}{field}: {error.message}"


def _unused(counts: Mapping[str, int]) -> str:
    """``"key (n records), ..."`` for the unused keys of a file."""
    return ", ".join(f"{key!r} ({n} records)" for key, n in counts.items())


def log_result(result: ReadResult[Any]) -> None:
    """Log what reading a file skipped, dropped and did not use."""
    logger = logging.getLogger(__name__)
    if result.skipped:
        reasons = "; ".join(_where(e) for e in result.skipped[:5])
        more = f" (and {len(result.skipped) - 5} more)" if len(result.skipped) > 5 else ""
        logger.warning(
            "%s: skipped %d invalid records: indices %s: %s%s",
            result.path,
            len(result.skipped),
            result.skipped_indices,
            reasons,
            more,
        )
    if result.unused_keys:
        logger.info(
            "%s: keys not used by the %s format (kept in EditRecord.meta): %s",
            result.path,
            result.format_name,
            _unused(result.unused_keys),
        )
    if result.unused_nested_keys:
        logger.warning(
            "%s: keys inside objects not read by the %s format (not kept): %s",
            result.path,
            result.format_name,
            _unused(result.unused_nested_keys),
        )
    if result.notes:
        logger.warning(
            "%s: dropped %d empty optional values in records %s (see ReadResult.notes)",
            result.path,
            len(result.notes),
            sorted({n.index for n in result.notes}),
        )


def read_records(
    path: str | Path, format: str | None = None, skip_invalid: bool = False
) -> ReadResult[EditRecord]:
    """Read a file of edit records (ZsRE, CounterFact, KnowEdit, WISE, ...).

    Args:
        path: A ``.json`` or ``.jsonl`` file.
        format: Force a format by name; detected when ``None``.
        skip_invalid: Leave invalid records out (reported and logged) instead of failing.

    Returns:
        The :class:`~lit_edit.records.EditRecord` items and the report.

    Raises:
        DataFileError: see :func:`read_file` (an LTE conversation file is reported as such).
    """
    return read_file(path, format, skip_invalid, readers=record_readers())


def read_conversations(
    path: str | Path, skip_invalid: bool = False
) -> ReadResult[ConversationPair]:
    """Read an LTE alignment file (FastChat conversations) into human → gpt exchanges.

    Args:
        path: A ``.json`` or ``.jsonl`` file.
        skip_invalid: Leave invalid conversations out (reported and logged) instead of failing.

    Returns:
        One :class:`~lit_edit.data.lte.ConversationPair` per exchange, and the report.

    Raises:
        DataFileError: see :func:`read_file`.
    """
    return read_file(path, None, skip_invalid, readers=[ConversationReader()])
