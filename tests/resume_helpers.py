"""Test-only callbacks for the resume tests (imported by the child processes they start)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class PauseAtStep(Callback):
    """Stop making progress at a given global step: write ``marker`` and sleep (to be killed).

    Args:
        step: The global step at whose batch start the run pauses.
        marker: File written when the pause begins.
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Pause (for ten minutes at most) once ``step`` optimizer steps are done."""
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(batch_idx))
            time.sleep(600)


class SeenRecords(Callback):
    """Record the training batches' record indices (which data each step saw).

    Attributes:
        seen: ``(global_step, [record.index, ...])`` of every training batch, in order.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int]]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Keep the step and the indices of the batch's records."""
        records = batch["records"] if isinstance(batch, dict) else batch
        self.seen.append((trainer.global_step, [r.index for r in records]))


class PauseAtTestBatch(Callback):
    """Pause ``test`` at the start of a given batch: write ``marker`` and sleep (to be killed).

    Args:
        batch: The index of the test batch at whose start the run pauses.
        marker: File written when the pause begins.
    """

    def __init__(self, batch: int, marker: str) -> None:
        self.batch = batch
        self.marker = marker

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Pause (for ten minutes at most) at batch ``batch``."""
        if batch_idx == self.batch:
            Path(self.marker).write_text(str(batch_idx))
            time.sleep(600)
