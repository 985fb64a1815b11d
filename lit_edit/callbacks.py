"""Trainer callbacks of general use (the evaluation loop is :mod:`lit_edit.evaluation_loop`)."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class TorchThreads(Callback):
    """Set torch's intra-op thread count for the run, and restore it at the end.

    Tiny models (the TinyFacts backbones) run fastest single-threaded, and on a busy 2-core
    machine a second thread can make every small matmul several times slower.

    Args:
        num_threads: Threads for ``torch.set_num_threads`` while the Trainer runs.
    """

    def __init__(self, num_threads: int = 1) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads
        self._before: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Switch to ``num_threads`` threads."""
        self._before = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Restore the previous thread count."""
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None
