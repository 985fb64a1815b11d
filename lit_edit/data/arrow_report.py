"""The validation of a ``datasets`` table, kept beside its cache so later runs skip the pass.

Validating every record of a 163k-record file takes seconds in each process of each run. What
it gives (the valid rows, the skipped records' errors, the notes and the unused keys) is written
next to the table's Arrow cache, keyed by the table's fingerprint, the format, ``skip_invalid``
and a hash of the reader code (``lit_edit/data/*.py`` and ``lit_edit/records.py``): a change of
the file, of the options or of the validation rules validates again. Without ``skip_invalid`` a
file with an invalid record raises before anything is kept, so every run gives its error.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_edit.data.fields import ReadNote
from lit_edit.data.reading import ReadResult
from lit_edit.records import DataFileError

if TYPE_CHECKING:
    from datasets import Dataset


def _code_hash() -> str:
    """A hash of the source of the readers and the record checks (the validation rules)."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in [*sorted(here.glob("*.py")), here.parent / "records.py"]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def report_path(table: Dataset, format_name: str | None, skip_invalid: bool) -> Path | None:
    """Where the validation of ``table`` is kept (``None`` for a table without a cache file).

    Args:
        table: The table.
        format_name: The format asked for (``None``: detected).
        skip_invalid: Whether invalid records are left out.
    """
    if not table.cache_files:
        return None
    folder = Path(table.cache_files[0]["filename"]).parent
    key = f"{table._fingerprint}:{format_name}:{skip_invalid}:{_code_hash()}"
    return folder / f"lit_edit-validation-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def save_report(path: Path | None, result: ReadResult[Any], rows: list[int]) -> None:
    """Keep the validation of a table (see the module docstring); a failed write is ignored.

    Args:
        path: From :func:`report_path`.
        result: The report (its ``records`` are not kept).
        rows: The valid rows.
    """
    if path is None:
        return
    data = {
        "format_name": result.format_name,
        "num_read": result.num_read,
        "rows": rows,
        "skipped": [[e.message, e.index, e.field] for e in result.skipped],
        "notes": [[n.index, n.field, n.message] for n in result.notes],
        "unused_keys": result.unused_keys,
        "unused_nested_keys": result.unused_nested_keys,
    }
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(data), encoding="utf-8")
        temporary.replace(path)  # atomic: another process never reads half a file
    except OSError:
        temporary.unlink(missing_ok=True)


def load_report(path: Path | None, source: str) -> tuple[ReadResult[Any], list[int]] | None:
    """The kept validation of a table, its errors naming ``source``; ``None`` when there is none.

    Args:
        path: From :func:`report_path`.
        source: The file or hub name, as given this time.
    """
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        result: ReadResult[Any] = ReadResult(
            source, data["format_name"], [], int(data["num_read"]),
            skipped=[DataFileError(source, m, i, f) for m, i, f in data["skipped"]],
            notes=[ReadNote(i, f, m) for i, f, m in data["notes"]],
            unused_keys=dict(data["unused_keys"]),
            unused_nested_keys=dict(data["unused_nested_keys"]),
        )
        return result, [int(r) for r in data["rows"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
