"""The list of known readers, and format detection from a file's first record."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lit_edit.data.base import BaseReader, RecordReader
from lit_edit.data.counterfact import CounterFactReader, RomeCounterFactReader
from lit_edit.data.knowedit import KnowEditReader, WikiBioReader
from lit_edit.data.lte import ConversationReader
from lit_edit.data.wise import WiseReader
from lit_edit.data.zsre import ZsreReader


def record_readers() -> list[RecordReader]:
    """A fresh list of the readers that produce :class:`~lit_edit.records.EditRecord`.

    Their ``matches`` tests are mutually exclusive, so detection does not depend on the order.
    """
    return [
        ZsreReader(),
        CounterFactReader(),
        RomeCounterFactReader(),
        KnowEditReader(),
        WikiBioReader(),
        WiseReader(),
    ]


def available_readers() -> list[BaseReader[Any]]:
    """A fresh list of every known reader: the edit-record readers and the LTE conversation one."""
    return [*record_readers(), ConversationReader()]


def reader_by_name(name: str, readers: Sequence[BaseReader[Any]] | None = None) -> BaseReader[Any]:
    """Return the reader whose ``format_name`` is ``name``.

    Args:
        name: A format name, e.g. ``"zsre"``.
        readers: Candidates (default: :func:`available_readers`).

    Raises:
        ValueError: if no candidate has that name (the message lists the known names).
    """
    candidates = available_readers() if readers is None else readers
    for reader in candidates:
        if reader.format_name == name:
            return reader
    known = ", ".join(r.format_name for r in candidates)
    raise ValueError(f"unknown data format {name!r}; known formats: {known}")


def detect_reader(
    raw: Mapping[str, Any], readers: Sequence[BaseReader[Any]] | None = None
) -> BaseReader[Any]:
    """Pick the reader whose ``matches`` accepts ``raw`` (a file's first record).

    Args:
        raw: A decoded JSON object.
        readers: Candidates (default: :func:`available_readers`).

    Raises:
        ValueError: if no candidate, or more than one, matches (the message lists the record's
            keys and the formats, to pass one explicitly).
    """
    candidates = available_readers() if readers is None else readers
    found = [r for r in candidates if r.matches(raw)]
    if len(found) == 1:
        return found[0]
    keys = ", ".join(sorted(map(str, raw)))
    names = ", ".join(r.format_name for r in (found or candidates))
    if not found:
        raise ValueError(
            f"cannot detect the data format from the first record's keys ({keys}); "
            f"known formats: {names}"
        )
    raise ValueError(
        f"the first record's keys ({keys}) match several formats ({names}); pass the format "
        "explicitly"
    )
