"""lit_edit: train and evaluate knowledge editors for causal language models with Lightning."""

from lit_edit.records import DataFileError, EditRecord, QAPair, RecordError

__all__ = ["DataFileError", "EditRecord", "QAPair", "RecordError"]
__version__ = "0.1.0"
