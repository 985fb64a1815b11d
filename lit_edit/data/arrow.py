"""Edit records at scale: Hugging Face ``datasets`` tables, records made from a row on access.

The ``"datasets"`` backend of :class:`~lit_edit.data.datamodule.EditDataModule` reads a file into
an Arrow table cached on disk (under ``HF_DATASETS_CACHE``, or ``cache_dir``) and memory-mapped:
the second run, and every other process of a multi-process run, opens the cache instead of
decoding the file again, and the processes of one machine share its pages. The split's records
are an :class:`ArrowRecords` sequence that builds an :class:`~lit_edit.records.EditRecord` from
its row when a data loader asks for it, instead of a Python list of every record.

What is read is exactly what the JSON backend reads:

* a ``.json`` / ``.jsonl`` file is decoded by the same code
  (:func:`~lit_edit.data.reading.load_raw`: same layouts, same file-level errors) and each record
  is stored as its JSON text (one string column), so a row decodes to the very object the JSON
  backend validates: Arrow's schema inference (which turns absent keys into nulls, ``1`` into
  ``1.0`` next to a float, and fails on a field that is a string in one record and a list in
  another) never sees the data;
* every record is validated when the split is read, by the same reader code
  (:func:`~lit_edit.data.reading.parse_located`): the same located errors naming the file, the
  record index and the field, the same ``skip_invalid`` report; what the validation gave is kept
  beside the cache (:mod:`lit_edit.data.arrow_report`), so later runs and the other processes
  do not validate again;
* ``.parquet`` files and hub datasets (``hf://ORG/NAME:SPLIT``) are typed tables: a row is the
  record with its null values left out (Arrow has no "absent"; every reader treats a null
  optional field as absent).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from lit_edit.data.arrow_report import load_report, report_path, save_report
from lit_edit.data.base import BaseReader, RecordReader
from lit_edit.data.detect import reader_by_name, record_readers
from lit_edit.data.reading import (
    ReadResult,
    count_valid,
    load_raw,
    log_result,
    parse_located,
    pick_reader,
)
from lit_edit.records import DataFileError, EditRecord

if TYPE_CHECKING:
    from datasets import Dataset

HUB_PREFIX = "hf://"
"""Prefix of a hub dataset source: ``hf://ORG/NAME:SPLIT``."""

RAW_COLUMN = "raw"
"""The column holding each record's JSON text in the table of a JSON file."""

_BATCH = 1024  # rows decoded at once when validating


def _json_rows(path: str, fingerprint: str) -> Iterator[dict[str, str]]:
    """The rows of a JSON file's table: each record's JSON text (``fingerprint`` keys the cache)."""
    del fingerprint
    raws = load_raw(path)
    if not raws:
        raise DataFileError(path, "contains no records")
    for raw in raws:
        yield {RAW_COLUMN: json.dumps(raw, ensure_ascii=False)}


def _file_fingerprint(path: Path) -> str:
    """A cache key of a file's content as of now: its absolute path, size and modification time."""
    stat = path.stat()
    key = f"lit_edit-raw-json-v1:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _unwrap(error: BaseException) -> DataFileError | None:
    """The :class:`DataFileError` a ``datasets`` error was raised from, if any."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, DataFileError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def open_table(source: str, cache_dir: str | None = None) -> tuple[Dataset, bool]:
    """Open (building its cache the first time) the Arrow table of a data source.

    Args:
        source: A ``.json``, ``.jsonl`` or ``.parquet`` file, or ``hf://ORG/NAME:SPLIT``.
        cache_dir: Where ``datasets`` keeps its tables (default: ``HF_DATASETS_CACHE``).

    Returns:
        The table, and whether its rows are JSON texts (a JSON file) rather than typed columns.

    Raises:
        DataFileError: for a missing or unreadable file, an unsupported extension, a hub dataset
            that cannot be loaded (e.g. offline), or an empty table.
    """
    import datasets

    json_rows = False
    try:
        if source.startswith(HUB_PREFIX):
            name, sep, split = source[len(HUB_PREFIX):].rpartition(":")
            if not sep or not name or not split:
                raise DataFileError(source, f"expected {HUB_PREFIX}ORG/NAME:SPLIT, e.g. "
                                    f"{HUB_PREFIX}azhx/counterfact:train")
            table = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
        else:
            path = Path(source)
            suffix = path.suffix.lower()
            if suffix == ".parquet":
                if not path.is_file():
                    raise DataFileError(source, "no such file")
                table = datasets.load_dataset("parquet", data_files=str(path), split="train",
                                              cache_dir=cache_dir)
            else:
                load_raw_checks(path, source)
                json_rows = True
                features = datasets.Features({RAW_COLUMN: datasets.Value("string")})
                fingerprint = _file_fingerprint(path)
                table = datasets.Dataset.from_generator(
                    _json_rows, features=features, cache_dir=cache_dir,
                    gen_kwargs={"path": str(path), "fingerprint": fingerprint},
                    fingerprint=fingerprint,
                )
    except DataFileError:
        raise
    except Exception as e:  # datasets wraps what the generator raised
        located = _unwrap(e)
        if located is not None:
            raise located from e
        raise DataFileError(source, f"cannot load with `datasets`: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(table, datasets.Dataset):
        raise DataFileError(source, f"expected one split, got {type(table).__name__}")
    if len(table) == 0:
        raise DataFileError(source, "contains no records")
    return table, json_rows


def load_raw_checks(path: Path, source: str) -> None:
    """The file-level checks of :func:`~lit_edit.data.reading.load_raw`, before any decoding.

    Args:
        path: The file.
        source: Its name in the errors.

    Raises:
        DataFileError: for a directory, a missing file or an extension other than
            ``.json``/``.jsonl``/``.parquet``.
    """
    if path.is_dir():
        raise DataFileError(source, "is a directory, not a data file (.json or .jsonl)")
    if not path.is_file():
        raise DataFileError(source, "no such file")
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise DataFileError(source, f"unsupported extension {path.suffix.lower()!r}; use .json, "
                            ".jsonl or .parquet")


def drop_nulls(value: Any) -> Any:
    """A typed row as a decoded record: null values of objects left out, at every depth."""
    if isinstance(value, Mapping):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _raws(table: Dataset, json_rows: bool, rows: Sequence[int] | None = None) -> Iterator[Any]:
    """Decode rows of ``table`` (all of them, in order, when ``rows`` is ``None``)."""
    if rows is not None:
        batch = table[list(rows)]
        columns = list(batch)
        count = len(rows)
        yield from _decode(batch, columns, count, json_rows)
        return
    for start in range(0, len(table), _BATCH):
        batch = table[start:start + _BATCH]
        columns = list(batch)
        yield from _decode(batch, columns, len(batch[columns[0]]), json_rows)


def decode_rows(batch: Mapping[str, list[Any]], json_rows: bool) -> Iterator[Any]:
    """Decode a batch of rows (as ``Dataset.map`` hands them over) into raw records.

    Args:
        batch: Column name to the batch's values.
        json_rows: Whether the rows are JSON texts (see :func:`open_table`).
    """
    columns = list(batch)
    count = len(batch[columns[0]]) if columns else 0
    return _decode(batch, columns, count, json_rows)


def _decode(batch: Mapping[str, list[Any]], columns: list[str], count: int,
            json_rows: bool) -> Iterator[Any]:
    if json_rows:
        yield from (json.loads(text) for text in batch[RAW_COLUMN])
        return
    for i in range(count):
        yield drop_nulls({c: batch[c][i] for c in columns})


class ArrowRecords(Sequence[EditRecord]):
    """Edit records backed by an Arrow table: each one built from its row when accessed.

    A :class:`~torch.utils.data.DataLoader` takes it as its dataset (``__getitems__`` fetches a
    batch's rows at once); it pickles by reference to the memory-mapped cache file, so worker
    processes do not copy the records.

    Args:
        table: The table (see :func:`open_table`).
        json_rows: Whether the rows are JSON texts.
        rows: The table rows of the records, in order (the valid records, or a subset).
        reader: The reader that validated them.
        source: The file or hub name (kept as ``EditRecord.source``).
    """

    def __init__(self, table: Dataset, json_rows: bool, rows: np.ndarray, reader: RecordReader,
                 source: str) -> None:
        self.table = table
        self.json_rows = json_rows
        self.rows = np.asarray(rows, dtype=np.int64)
        self.reader = reader
        self.source = source

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> EditRecord: ...

    @overload
    def __getitem__(self, index: slice) -> ArrowRecords: ...

    def __getitem__(self, index: int | slice) -> EditRecord | ArrowRecords:
        if isinstance(index, slice):
            return self.select(range(len(self))[index])
        row = int(self.rows[index])
        return self.build(row, next(_raws(self.table, self.json_rows, [row])))

    def __getitems__(self, indices: Sequence[int]) -> list[EditRecord]:
        """The records at ``indices`` (one table read for the batch)."""
        rows = [int(self.rows[i]) for i in indices]
        return [self.build(r, raw) for r, raw in zip(rows, _raws(self.table, self.json_rows,
                                                                   rows), strict=True)]

    def build(self, row: int, raw: Any) -> EditRecord:
        """The record of table row ``row`` from its decoded ``raw`` object."""
        return self.reader.parse(raw, row, self.source)

    def select(self, indices: Sequence[int]) -> ArrowRecords:
        """The records at ``indices`` (positions in this sequence), in that order.

        Args:
            indices: Positions, e.g. a split's or a subsample's.
        """
        return ArrowRecords(self.table, self.json_rows, self.rows[np.asarray(indices, dtype=int)],
                            self.reader, self.source)


def read_records_arrow(
    source: str, format: str | None = None, skip_invalid: bool = False,
    cache_dir: str | None = None, log: bool = True,
) -> ReadResult[EditRecord]:
    """Read a file of edit records through ``datasets`` (see the module docstring).

    Every record is validated as :func:`~lit_edit.data.reading.read_records` does (or the
    validation kept from an earlier read of the same table, format, ``skip_invalid`` and reader
    code is used); the result's ``records`` is an :class:`ArrowRecords` of the valid ones.

    Args:
        source: A ``.json``, ``.jsonl`` or ``.parquet`` file, or ``hf://ORG/NAME:SPLIT``.
        format: Force a format by name; detected from the first JSON object record when ``None``.
        skip_invalid: Leave invalid records out (reported and logged) instead of failing.
        cache_dir: Where ``datasets`` keeps its tables (default: ``HF_DATASETS_CACHE``).
        log: Log what was skipped, dropped and not used (as the JSON backend does).

    Returns:
        The records and the report (same skipped records, notes and unused keys as the JSON
        backend).

    Raises:
        DataFileError: see :func:`open_table` and :func:`~lit_edit.data.reading.read_file`.
    """
    table, json_rows = open_table(source, cache_dir)
    kept_at = report_path(table, format, skip_invalid)
    kept = load_report(kept_at, source)
    if kept is not None:
        result, valid = kept
        reader = reader_by_name(result.format_name, record_readers())
    else:
        result, valid, reader = _validate(table, json_rows, source, format, skip_invalid)
        save_report(kept_at, result, valid)
    assert isinstance(reader, RecordReader)
    result.records = ArrowRecords(table, json_rows, np.asarray(valid, dtype=np.int64), reader,
                                  source)  # type: ignore[assignment]
    if log:
        log_result(result)
    return result


def _validate(
    table: Dataset, json_rows: bool, source: str, format: str | None, skip_invalid: bool
) -> tuple[ReadResult[EditRecord], list[int], BaseReader[Any]]:
    """Validate every row as :func:`~lit_edit.data.reading.read_file` does.

    Returns:
        The report (without records), the valid rows and the reader.
    """
    first = next(((i, r) for i, r in enumerate(_raws(table, json_rows))
                  if isinstance(r, Mapping)), None) if format is None else None
    reader = pick_reader(source, format, record_readers(), first)
    result: ReadResult[EditRecord] = ReadResult(source, reader.format_name, [], 0)
    valid: list[int] = []
    for index, raw in enumerate(_raws(table, json_rows)):
        notes: list[Any] = []
        try:
            parse_located(reader, raw, index, source, notes)
        except DataFileError as error:
            if not skip_invalid:
                raise
            result.skipped.append(error)
            continue
        valid.append(index)
        count_valid(result, reader, raw, notes)
    return result, valid, reader
