"""Edit data: readers that normalise every source into ``EditRecord``, collate, DataModule.

The readers (:mod:`lit_edit.data.reading`) need nothing heavy; the collate functions (torch) and
:class:`EditDataModule` (Lightning) are imported on first access, so that ``python -m
lit_edit.data`` (the check command) starts at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lit_edit.data.base import BaseReader, RecordReader
from lit_edit.data.counterfact import CounterFactReader, RomeCounterFactReader
from lit_edit.data.detect import available_readers, detect_reader, reader_by_name, record_readers
from lit_edit.data.fields import ReadNote
from lit_edit.data.knowedit import KnowEditReader, WikiBioReader
from lit_edit.data.lte import ConversationPair, ConversationReader
from lit_edit.data.reading import (
    ReadResult,
    load_raw,
    read_conversations,
    read_file,
    read_records,
)
from lit_edit.data.wise import WiseReader
from lit_edit.data.zsre import ZsreReader

if TYPE_CHECKING:
    from lit_edit.data.arrow import ArrowRecords, read_records_arrow
    from lit_edit.data.collate import EditCollator, PairCollator, collate_records
    from lit_edit.data.datamodule import EditDataModule
    from lit_edit.data.tinyfacts import TinyFactsDataModule
    from lit_edit.data.transfer import move_batch_to_device

__all__ = [
    "ArrowRecords",
    "BaseReader",
    "ConversationPair",
    "ConversationReader",
    "CounterFactReader",
    "EditCollator",
    "EditDataModule",
    "KnowEditReader",
    "PairCollator",
    "ReadNote",
    "ReadResult",
    "RecordReader",
    "RomeCounterFactReader",
    "TinyFactsDataModule",
    "WikiBioReader",
    "WiseReader",
    "ZsreReader",
    "available_readers",
    "collate_records",
    "detect_reader",
    "load_raw",
    "move_batch_to_device",
    "read_conversations",
    "read_file",
    "read_records",
    "read_records_arrow",
    "reader_by_name",
    "record_readers",
]


def __getattr__(name: str) -> Any:
    """Import the torch/Lightning-backed names on first access (PEP 562)."""
    if name in ("ArrowRecords", "read_records_arrow"):
        from lit_edit.data import arrow

        return getattr(arrow, name)
    if name == "EditDataModule":
        from lit_edit.data.datamodule import EditDataModule

        return EditDataModule
    if name in ("EditCollator", "PairCollator", "collate_records"):
        from lit_edit.data import collate

        return getattr(collate, name)
    if name == "TinyFactsDataModule":
        from lit_edit.data.tinyfacts import TinyFactsDataModule

        return TinyFactsDataModule
    if name == "move_batch_to_device":
        from lit_edit.data.transfer import move_batch_to_device

        return move_batch_to_device
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
