"""Trainer callbacks of general use (the evaluation loop is :mod:`lit_edit.evaluation_loop`)."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_edit.random_state import random_states, set_random_states

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


class RandomStateCheckpoint(Callback):
    """Save the global random states in every checkpoint; a resumed ``fit`` continues them.

    A run seeds its generators once (``seed_everything``); a run resumed from a checkpoint is
    seeded again from the start, so whatever draws from the global streams while training
    (dropout, sampled negatives, ...) would draw other numbers than the uninterrupted run. The
    states saved with the checkpoint are put back when training starts (after the sanity
    check, whose draws the uninterrupted run made before its first step too), not in ``test``
    or ``validate``. Every editor adds this callback
    (:meth:`~lit_edit.methods.EditorModule.configure_callbacks`).
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The global random states now (:func:`~lit_edit.random_state.random_states`)."""
        return random_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved states until training starts."""
        self._loaded = dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put the loaded states back (a resumed ``fit``)."""
        if self._loaded is not None:
            set_random_states(self._loaded)
            self._loaded = None


class StepCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` that also saves the last step.

    Lightning's checkpoint saves every ``every_n_train_steps`` steps (or at validation), and at
    the end of training only when nothing was saved before: with ``max_steps`` not a multiple
    of the interval, ``last.ckpt`` (and, without ``monitor``, the top-k file, e.g. a config's
    ``final.ckpt``) missed the last steps. Here the end of training saves them when the last
    step has no checkpoint yet: ``last.ckpt`` always, the top-k file only without ``monitor``
    (a monitored one is chosen on validation metrics, which the last steps may not have).

    Args:
        **kwargs: Those of :class:`~lightning.pytorch.callbacks.ModelCheckpoint`.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the final step if it has no checkpoint yet (see the class docstring)."""
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if self.monitor is None and self.save_top_k != 0:
                self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
