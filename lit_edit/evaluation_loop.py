"""The test loop of an editor: Lightning's ``trainer.test`` turned into an editing evaluation.

:class:`EvaluationLoop` is a Lightning callback. At the start of ``test`` it opens an
:class:`~lit_edit.evaluation_run.EvaluationRun` with the editor's evaluation settings; every test
batch of edit records goes to it (the protocol runs on each complete group), each group's means
go to TensorBoard, the final metrics are logged as ``test/<metric>``, and a results folder is
written (``records.jsonl``, ``summary.json``, ``table.md``, ``sequential.png``). The editor only
edits and answers; it knows nothing of this loop.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_edit.editing import ParameterSnapshot
from lit_edit.evaluation import Evaluation
from lit_edit.evaluation_run import EvaluationRun
from lit_edit.report import markdown_table, plot_sequential

log = logging.getLogger(__name__)


def _gather(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' rows on every rank (identity without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    gathered: list[list[dict[str, Any]] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    return [row for part in gathered if part for row in part]


def _records_per_rank(loaders: Any) -> int | None:
    """Records this process will see in the test loaders (``None`` when unknown)."""
    if loaders is None:
        return None
    loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
    try:
        return sum(len(dl.sampler) for dl in loaders)  # a DistributedSampler counts one rank
    except (TypeError, AttributeError):
        return None


class EvaluationLoop(Callback):
    """Run the editing evaluation of ``trainer.test`` and write its results folder.

    The settings are the editor's ``evaluation`` attribute (an
    :class:`~lit_edit.evaluation.Evaluation`; the CLI's ``evaluation:`` section), or the
    defaults. The folder (``evaluation.results_dir``, or ``<log_dir>/results``) holds
    ``records.jsonl`` (one line per edit record: source index, prompt, target, every metric's
    pre- and post-edit value), ``summary.json`` (one key per metric in [0, 1] plus the protocol
    and settings), ``table.md`` and ``sequential.png`` (metrics against the number of
    sequential edits). Its path is printed at the end.

    Attributes:
        run: The current (or last) evaluation run.
        report: The tables and the results path of the last run, as printed (``None`` before).
            An editor whose ``defer_report`` attribute is true is not printed at the end of
            the run: the CLI prints it after Lightning's table of test metrics.
    """

    def __init__(self) -> None:
        self.run: EvaluationRun | None = None
        self.report: str | None = None
        self._bar: Any = None

    @staticmethod
    def settings(pl_module: L.LightningModule) -> Evaluation:
        """The evaluation settings of the editor under test."""
        settings = getattr(pl_module, "evaluation", None)
        return settings if isinstance(settings, Evaluation) else Evaluation()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Open a run: fresh metrics, results and (optionally) a weight snapshot."""
        settings = self.settings(pl_module)
        settings.protocol.check(pl_module)
        snapshot = ParameterSnapshot(pl_module) if settings.verify_restore else None
        self._bar = None
        if trainer.progress_bar_callback is not None and trainer.is_global_zero:
            from tqdm.auto import tqdm

            total = _records_per_rank(trainer.test_dataloaders)
            self._bar = tqdm(total=total, desc="edits", unit="edit", dynamic_ncols=True)
        progress = self._bar.update if self._bar is not None else None
        self.run = EvaluationRun(
            settings, snapshot=snapshot, device=pl_module.device, progress=progress
        )

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        """Queue the batch's records and run the protocol on every complete group."""
        assert self.run is not None
        for means in self.run.add(pl_module, batch):
            self._log_group(trainer, means)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Run the last incomplete group and log the aggregated metrics (``test/<metric>``).

        Method-specific per-record values (the editor's ``record_values``, e.g. LTE's retrieval
        hit rates) are logged as their means, ``test/<key>`` with ``/`` replaced by ``_``.
        """
        assert self.run is not None
        for means in self.run.flush(pl_module):
            self._log_group(trainer, means)
        values = {f"test/{k}": v for k, v in self.run.computed().items() if v is not None}
        for key, value in self.run.extra_means().items():
            values["test/" + key.replace("/", "_")] = value
        pl_module.log_dict(values, sync_dist=False, batch_size=1)
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Gather every rank's records and write the results folder from rank 0."""
        if self.run is None:
            return
        rows = _gather(self.run.rows())
        summary = self.run.summary(pl_module, rows)
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
        self.report = f"\n{table}\n\nResults written to {folder.resolve()}"
        if not getattr(pl_module, "defer_report", False):
            print(self.report)

    def _log_group(self, trainer: L.Trainer, values: dict[str, float]) -> None:
        """Log one group's means as TensorBoard scalars indexed by the number of edits so far."""
        logger = trainer.logger
        if logger is None or trainer.global_rank != 0 or self.run is None:
            return
        experiment = getattr(logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_scalar"):
            return
        for name, value in values.items():
            experiment.add_scalar(f"test_groups/{name}", value, global_step=self.run.n_edited)

    def results_dir(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """The folder of this run's results."""
        configured = self.settings(pl_module).results_dir
        if configured:
            return Path(configured)
        base = trainer.log_dir or trainer.default_root_dir
        return Path(base) / "results"
