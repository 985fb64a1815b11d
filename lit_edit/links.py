"""What an editor and its data module hand each other before training, explicitly.

Some data needs the model (LTE's unedited twins of portability questions are the unedited
model's own answers), and some training needs the data (LTE's scope head trains on the data's
edit records); a multi-process evaluation shards the test records by the editor's protocol
groups (a batch of edits stays on one process). Instead of reaching each other through
``trainer.lightning_module`` and ``trainer.datamodule``, each side declares what it offers or
takes, and :func:`connect` hands it over: ``train.py`` calls it once both are built; from Python,
call it before ``Trainer.fit`` (or ``Trainer.test``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from lit_edit.records import EditRecord

Answerer = Callable[[list[str]], list[str]]
RecordsOf = Callable[[str], list[EditRecord]]


@runtime_checkable
class AnswersBareQuestions(Protocol):
    """A model that answers bare questions (greedy, before training changes it)."""

    def unedited_answers(self, questions: list[str], max_new_tokens: int = 16) -> list[str]:
        """The model's answers to ``questions``, in order."""
        ...


@runtime_checkable
class TakesAnswerer(Protocol):
    """A data module that builds some samples from a model's answers."""

    def answer_with(self, answerer: Answerer) -> None:
        """Use ``answerer`` for the answers it needs from the model."""
        ...


@runtime_checkable
class OffersEditRecords(Protocol):
    """A data module with edit records per split (after its ``setup``)."""

    def edit_records(self, split: str) -> list[EditRecord]:
        """The edit records of ``split``."""
        ...


@runtime_checkable
class TakesEditRecords(Protocol):
    """A model that trains a part (e.g. a scope head) on the data's edit records."""

    def train_on_records(self, records_of: RecordsOf) -> None:
        """Use ``records_of(split)`` for the edit records it trains on."""
        ...


@runtime_checkable
class EvaluatesInGroups(Protocol):
    """A model whose test protocol needs runs of consecutive records on one process."""

    def test_shard_unit(self) -> int:
        """Consecutive test records one process must evaluate together."""
        ...


@runtime_checkable
class ShardsTestRecords(Protocol):
    """A data module that shards its test records across processes in runs of ``unit``."""

    def shard_test_records(self, unit: int) -> None:
        """Keep runs of ``unit`` consecutive test records on one process."""
        ...


def connect(model: object, datamodule: object | None) -> None:
    """Hand over what the model and its data module take from each other.

    The model's answerer and its test shard unit go to the data module, the data's edit records
    to the model.

    Only what one side takes and the other offers is handed over; anything else is left alone.

    Args:
        model: The editor (a LightningModule).
        datamodule: Its data module, or ``None``.
    """
    if datamodule is None:
        return
    if isinstance(datamodule, TakesAnswerer) and isinstance(model, AnswersBareQuestions):
        datamodule.answer_with(model.unedited_answers)
    if isinstance(model, TakesEditRecords) and isinstance(datamodule, OffersEditRecords):
        model.train_on_records(datamodule.edit_records)
    if isinstance(model, EvaluatesInGroups) and isinstance(datamodule, ShardsTestRecords):
        datamodule.shard_test_records(model.test_shard_unit())
