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
from lit_edit.evaluation_resume import (
    ResultsFolder,
    ResultsFolderError,
    row_order,
    run_identity,
)
from lit_edit.evaluation_run import EvaluationRun
from lit_edit.protocols import EditingProtocol
from lit_edit.report import markdown_table, plot_sequential
from lit_edit.sharding import ShardingError, ShardSampler

log = logging.getLogger(__name__)


def _gather(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' rows on every rank, in rank order (identity without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    gathered: list[list[dict[str, Any]] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    return [row for part in gathered if part for row in part]


def _loaders(loaders: Any) -> list[Any]:
    """The test dataloaders as a list."""
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def shard_start(loaders: Any, protocol: EditingProtocol, world_size: int) -> int:
    """Where this process's test records start among all records; checks the sharding first.

    In one process, ``0``. With more, the test records must come from one dataloader sharded
    by a :class:`~lit_edit.sharding.ShardSampler` over as many processes, in runs of (a
    multiple of) the protocol's :attr:`~lit_edit.protocols.EditingProtocol.shard_unit`: then
    every record is evaluated exactly once, in the groups one process would form.

    Args:
        loaders: The trainer's test dataloaders.
        protocol: The editing protocol.
        world_size: Number of processes.

    Raises:
        ShardingError: with one line saying what is wrong and what to do, when the records would
            be duplicated (Lightning's padding ``DistributedSampler``), dropped or regrouped.
    """
    if world_size == 1:
        return 0
    found = _loaders(loaders)
    if len(found) != 1:
        raise ShardingError(
            f"an evaluation on {world_size} devices needs exactly one test dataloader, got "
            f"{len(found)}: merge them, or use --trainer.devices 1"
        )
    sampler = getattr(found[0], "sampler", None)
    if not isinstance(sampler, ShardSampler):
        raise ShardingError(
            f"the test records are not sharded by lit_edit.sharding.ShardSampler (the loader's "
            f"sampler is a {type(sampler).__name__}): on {world_size} devices Lightning's "
            "DistributedSampler would pad them and score some twice; give the test DataLoader "
            "sampler=ShardSampler(len(records), unit), or use --trainer.devices 1"
        )
    unit = protocol.shard_unit
    name = protocol.describe().get("protocol", type(protocol).__name__)
    if sampler.unit % unit:
        raise ShardingError(
            f"the test records are sharded in runs of {sampler.unit} but the {name} protocol "
            f"keeps {unit} consecutive records together: call lit_edit.links.connect(editor, "
            "datamodule) after setting editor.evaluation, or use --trainer.devices 1"
        )
    if sampler.num_replicas != world_size:
        raise ShardingError(
            f"the test records are sharded over {sampler.num_replicas} processes, the trainer "
            f"runs {world_size}"
        )
    return sampler.bounds()[0]


def _records_per_rank(loaders: Any) -> int | None:
    """Records this process will see in the test loaders (``None`` when unknown)."""
    if loaders is None:
        return None
    try:
        return sum(len(dl.sampler) for dl in _loaders(loaders))  # a shard sampler: one rank
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

    On several processes (``--trainer.devices N``) each process evaluates its shard of the
    records (:func:`shard_start` checks the sharding), the rows of all processes are gathered
    in the records' order and rank 0 alone writes the folder: the same files as one process.

    In one process the folder is written as the run goes (:mod:`lit_edit.evaluation_resume`):
    each completed group's rows are appended to ``records.jsonl``, and a run killed before its
    end is continued by the next run given the same folder. A multi-process run writes the
    folder at its end only, and refuses a folder holding an unfinished run.

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
        self._rows: list[dict[str, Any]] | None = None  # every rank's rows, once gathered
        self._folder: ResultsFolder | None = None  # the folder written as the run goes

    @staticmethod
    def settings(pl_module: L.LightningModule) -> Evaluation:
        """The evaluation settings of the editor under test."""
        settings = getattr(pl_module, "evaluation", None)
        return settings if isinstance(settings, Evaluation) else Evaluation()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Open a run: fresh metrics, results and (optionally) a weight snapshot.

        On several processes, first check that the records are sharded without padding, by
        whole protocol groups (:func:`shard_start`; every process fails alike otherwise).
        """
        settings = self.settings(pl_module)
        if (trainer.world_size > 1 and settings.results_dir
                and (Path(settings.results_dir) / "resume.pt").is_file()):
            raise ResultsFolderError(
                f"{settings.results_dir} holds an unfinished run (resume.pt) and a run on "
                f"{trainer.world_size} processes does not continue one: continue it with "
                "--trainer.devices 1, or give another --evaluation.results_dir"
            )
        settings.protocol.check(pl_module)
        start = shard_start(trainer.test_dataloaders, settings.protocol, trainer.world_size)
        snapshot = ParameterSnapshot(pl_module) if settings.verify_restore else None
        self._bar = None
        if trainer.progress_bar_callback is not None and trainer.is_global_zero:
            from tqdm.auto import tqdm

            total = _records_per_rank(trainer.test_dataloaders)
            self._bar = tqdm(total=total, desc="edits", unit="edit", dynamic_ncols=True)
        progress = self._bar.update if self._bar is not None else None
        self.run = EvaluationRun(
            settings, snapshot=snapshot, device=pl_module.device, progress=progress, start=start
        )
        self._rows = None
        self._folder = None
        if trainer.world_size == 1:
            folder = self.results_dir(trainer, pl_module)
            self._folder = ResultsFolder(folder, run_identity(trainer, pl_module, settings))
            self._folder.open(self.run)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        """Queue the batch's records and run the protocol on every complete group."""
        assert self.run is not None
        groups = self.run.add(pl_module, batch)
        for means in groups:
            self._log_group(trainer, means)
        if groups and self._folder is not None:
            self._folder.save(self.run)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Run the last incomplete group and log the aggregated metrics (``test/<metric>``).

        Method-specific per-record values (the editor's ``record_values``, e.g. LTE's retrieval
        hit rates) are logged as their means, ``test/<key>`` with ``/`` replaced by ``_``. In a
        multi-process run every process gathers all processes' rows here (a collective every
        process reaches), and the logged values are those of all records.
        """
        assert self.run is not None
        for means in self.run.flush(pl_module):
            self._log_group(trainer, means)
        self._rows = _gather(self.run.rows())
        values = {f"test/{k}": v for k, v in self.run.computed().items() if v is not None}
        for key, value in self.run.extra_means(self._rows).items():
            values["test/" + key.replace("/", "_")] = value
        pl_module.log_dict(values, sync_dist=False, batch_size=1)
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the results folder of every rank's records, from rank 0.

        Every rank computes the summary and resolves the folder (both may be collectives: the
        metrics' sync, ``trainer.log_dir``); only rank 0 writes.
        """
        if self.run is None:
            return
        rows = self._rows if self._rows is not None else _gather(self.run.rows())
        self._rows = None
        summary = self.run.summary(pl_module, rows)
        folder = self.results_dir(trainer, pl_module)
        if trainer.global_rank != 0:
            return
        rows = sorted(rows, key=row_order)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "records.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        table = markdown_table(summary, method=type(pl_module).__name__)
        (folder / "table.md").write_text(table + "\n")
        plot_sequential(rows, folder / "sequential.png", title=type(pl_module).__name__)
        (folder / "resume.pt").unlink(missing_ok=True)  # complete: nothing left to continue
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
