"""The results writer: a folder per evaluation run with scores, a summary, a table, a plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_edit.report import markdown_table, plot_sequential

log = logging.getLogger(__name__)


def _gather(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' rows on every rank (identity without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    gathered: list[list[dict[str, Any]] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    return [row for part in gathered if part for row in part]


class ResultsWriter(Callback):
    """Write the results of ``trainer.test`` on an :class:`~lit_edit.methods.base.EditorModule`.

    The folder (``evaluation.results_dir``, or ``<log_dir>/results``) holds ``records.jsonl``
    (one line per edit record: source index, prompt, target, every metric's pre- and post-edit
    value), ``summary.json`` (one key per metric in [0, 1] plus the protocol and settings),
    ``table.md`` (the KnowEdit layout, x100, and every metric) and ``sequential.png`` (metrics
    against the number of sequential edits). Its path is printed at the end.
    """

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Gather every rank's records and write the folder from rank 0."""
        run = getattr(pl_module, "evaluation_run", None)
        if run is None:
            return
        rows = _gather(run.rows())
        summary = run.summary(pl_module, rows)
        if trainer.global_rank != 0:
            return
        rows.sort(key=lambda r: (r["group"], r["position"], r["index"]))
        folder = self.results_dir(trainer, pl_module)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "records.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        table = markdown_table(summary, method=type(pl_module).__name__)
        (folder / "table.md").write_text(table + "\n")
        plot_sequential(rows, folder / "sequential.png", title=type(pl_module).__name__)
        print(f"\n{table}\n\nResults written to {folder.resolve()}")

    @staticmethod
    def results_dir(trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """The folder of this run's results."""
        configured = getattr(getattr(pl_module, "evaluation", None), "results_dir", None)
        if configured:
            return Path(configured)
        base = trainer.log_dir or trainer.default_root_dir
        return Path(base) / "results"


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
