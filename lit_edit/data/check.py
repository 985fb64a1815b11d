"""``python -m lit_edit.data``: detect, validate and summarise data files.

Usage::

    python -m lit_edit.data [--skip-invalid] [--format F] PATH [PATH ...]

For each file it prints ``<path>: <format>, <n> records``, what was skipped or dropped, every
key the format does not use (top-level ones, kept in ``meta``, then those inside its nested
objects, as dotted paths), with how many records have it, and the first record as normalised
(JSON). The exit code is 0 when every file is valid, 1 when a file is
malformed (or, with ``--skip-invalid``, has no valid record), 2 for a usage error. An error is
one ``error: <path>: ...`` line; ``LIT_EDIT_TRACEBACK=1`` raises it with its traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from lit_edit.data.detect import available_readers
from lit_edit.data.reading import ReadResult, read_file
from lit_edit.records import DataFileError

MAX_LISTED = 10
"""How many skipped records / notes are listed one by one."""


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser (the format choices come from the known readers)."""
    readers = available_readers()
    formats = "\n".join(f"  {r.format_name:18} {r.description}" for r in readers)
    parser = argparse.ArgumentParser(
        prog="python -m lit_edit.data",
        description="Detect the format of knowledge-editing data files, validate every record, "
        "and show the first record as normalised.",
        epilog=f"formats:\n{formats}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help=".json or .jsonl data files")
    parser.add_argument(
        "--format",
        choices=[r.format_name for r in readers],
        default=None,
        help="read every file in this format instead of detecting it",
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip invalid records (and list them) instead of failing on the first one",
    )
    return parser


def _where(error: DataFileError) -> str:
    field = f", field '{error.field}'" if error.field is not None else ""
    return f"record {error.index}{field}: {error.message}"


def _listing(lines: Sequence[str], out: TextIO) -> None:
    for line in lines[:MAX_LISTED]:
        print(f"    {line}", file=out)
    if len(lines) > MAX_LISTED:
        print(f"    ... and {len(lines) - MAX_LISTED} more", file=out)


def report(result: ReadResult[Any], out: TextIO) -> None:
    """Print the summary of one file read (see the module docstring).

    Args:
        result: What reading the file gave.
        out: Where to print.
    """
    count = f"{result.num_read} records"
    if len(result.records) != result.num_read:
        count += f" ({len(result.records)} exchanges)"
    print(f"{result.path}: {result.format_name}, {count}", file=out)
    if result.skipped:
        print(
            f"  skipped {len(result.skipped)} invalid records: indices {result.skipped_indices}",
            file=out,
        )
        _listing([_where(e) for e in result.skipped], out)
    if result.unused_keys:
        print("  keys not used (kept verbatim in meta):", file=out)
        _listing([f"{key} ({n} records)" for key, n in result.unused_keys.items()], out)
    if result.unused_nested_keys:
        print("  keys inside objects not used (not kept):", file=out)
        _listing([f"{key} ({n} records)" for key, n in result.unused_nested_keys.items()], out)
    if result.notes:
        print(f"  dropped {len(result.notes)} empty optional values:", file=out)
        _listing([str(n) for n in result.notes], out)
    if result.records:
        first = json.dumps(result.records[0].to_dict(), indent=2, ensure_ascii=False)
        print("  first record:", file=out)
        print("\n".join(f"  {line}" for line in first.splitlines()), file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check command.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        0 if every file is valid, 1 if one is malformed or has no valid record, 2 on a usage
        error.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on usage errors
        return int(e.code or 0)
    status = 0
    for path in args.paths:
        try:
            result = read_file(path, args.format, args.skip_invalid)
        except DataFileError as e:
            if os.environ.get("LIT_EDIT_TRACEBACK", "") not in ("", "0"):
                raise
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        report(result, sys.stdout)
        if not result.records:
            print(f"error: {path}: no valid record", file=sys.stderr)
            status = 1
    return status
