"""Resumable evaluations: the results folder records which records are done.

While ``evaluate.py`` runs (one process), every completed protocol group appends its rows to
``records.jsonl`` (flushed to disk) and then replaces ``resume.pt`` beside it: how many records
are done, the metrics' states (torchmetrics sums) and what identifies the run (editor, its
settings, checkpoint, records, evaluation settings, environment). A second run given the same
folder (``evaluation.results_dir``) continues after the last recorded group, and its
``records.jsonl`` and ``summary.json`` are those of an uninterrupted run: the done rows are read
back as they were written, the metric sums continue from the saved ones in the same order.
A finished run removes ``resume.pt``; a folder whose unfinished run is another run's is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_edit.environment import describe_environment
from lit_edit.evaluation import Evaluation
from lit_edit.evaluation_run import EvaluationRun, _jsonable

log = logging.getLogger(__name__)


class ResultsFolderError(ValueError):
    """A results folder that cannot be continued by this run (one line says why)."""


def row_order(row: dict[str, Any]) -> tuple[int, int, int]:
    """The sort key of ``records.jsonl`` rows: group, position in the group, record index."""
    return (row["group"], row["position"], row["index"])


def run_identity(
    trainer: L.Trainer, editor: L.LightningModule, settings: Evaluation
) -> dict[str, Any]:
    """What must be equal for a run to continue another one's results folder.

    Args:
        trainer: The trainer running ``test`` (its test records and checkpoint path).
        editor: The editor under test (its class and hyper-parameters).
        settings: The evaluation settings (``results_dir`` aside).

    Returns:
        A JSON-able dict: ``method``, ``hyper_parameters``, ``checkpoint`` (path, size and
        modification time, or ``None``), ``data`` (class, number and SHA-256 of the test
        records in loader order), ``evaluation`` and ``environment``.
    """
    digest = hashlib.sha256()
    n_records = 0
    loaders = trainer.test_dataloaders
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        for record in getattr(loader, "dataset", None) or []:
            digest.update(repr(record).encode("utf-8"))
            n_records += 1
    checkpoint = None
    if trainer.ckpt_path:
        path = Path(trainer.ckpt_path).resolve()
        stat = path.stat()
        checkpoint = {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    data = trainer.datamodule
    evaluation = {k: v for k, v in settings.describe().items() if k != "results_dir"}
    identity = {
        "method": f"{type(editor).__module__}.{type(editor).__qualname__}",
        "hyper_parameters": {
            k: _jsonable(v) for k, v in dict(getattr(editor, "hparams", {})).items()
        },
        "checkpoint": checkpoint,
        "data": {
            "class": None if data is None else f"{type(data).__module__}.{type(data).__qualname__}",
            "records": n_records,
            "sha256": digest.hexdigest(),
        },
        "evaluation": evaluation,
        "environment": describe_environment(),
    }
    return json.loads(json.dumps(identity))  # tuples as lists: comparable with a loaded one


class ResultsFolder:
    """The results folder of a running evaluation: its rows so far and how to continue.

    Args:
        folder: The results folder.
        identity: The run's :func:`run_identity`.
    """

    def __init__(self, folder: Path, identity: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.identity = identity
        self.rows_written = 0

    @property
    def state_path(self) -> Path:
        """``resume.pt``: the state of an unfinished run."""
        return self.folder / "resume.pt"

    @property
    def records_path(self) -> Path:
        """``records.jsonl``: one line per done record."""
        return self.folder / "records.jsonl"

    def open(self, run: EvaluationRun) -> int:
        """Continue the folder's unfinished run in ``run``, or start the folder afresh.

        Rows past the saved state (a group appended when the run was killed before its state
        was saved) are dropped: that group runs again.

        Args:
            run: The new evaluation run (nothing evaluated yet).

        Returns:
            The number of records already done (``0`` for a fresh start).

        Raises:
            ResultsFolderError: if the folder's unfinished run is not this run (another editor,
                checkpoint, data, settings or environment), or its files are damaged.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.state_path.is_file():
            self.records_path.write_text("", encoding="utf-8")
            return 0
        try:
            state = torch.load(self.state_path, weights_only=True)
        except Exception as e:  # a damaged file: the user decides what to do with it
            raise ResultsFolderError(
                f"{self.state_path}: unreadable ({type(e).__name__}); delete it to start the "
                "evaluation over"
            ) from e
        self._check_identity(json.loads(state["identity"]))
        rows = self._read_rows(int(state["rows"]))
        run.resume(state["progress"], rows)
        self._write_rows(rows, mode="w")
        log.info("%s: continuing an unfinished evaluation, %d records done", self.folder,
                 state["progress"]["done"])
        return int(state["progress"]["done"])

    def _check_identity(self, saved: dict[str, Any]) -> None:
        differ = [k for k in sorted(set(saved) | set(self.identity))
                  if saved.get(k) != self.identity.get(k)]
        if differ:
            raise ResultsFolderError(
                f"{self.folder} holds an unfinished evaluation of another run (its "
                f"{', '.join(differ)} differ from this run's): give another "
                f"evaluation.results_dir, or delete {self.state_path} to start over"
            )

    def _read_rows(self, n: int) -> list[dict[str, Any]]:
        lines = self.records_path.read_text(encoding="utf-8").splitlines()
        if len(lines) < n:
            raise ResultsFolderError(
                f"{self.records_path} has {len(lines)} rows, its resume.pt says {n} are done: "
                f"delete {self.state_path} to start the evaluation over"
            )
        return [json.loads(line) for line in lines[:n]]

    def _write_rows(self, rows: list[dict[str, Any]], mode: str) -> None:
        with open(self.records_path, mode, encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows_written = len(rows) if mode == "w" else self.rows_written + len(rows)

    def save(self, run: EvaluationRun) -> None:
        """Append the rows of the groups done since the last save, then save the state.

        The rows go in the order of the finished file (:func:`row_order`; groups complete in
        increasing order), so that the rows read back on a resume are the final file's first.
        """
        self._write_rows(sorted(run.rows_since(self.rows_written), key=row_order), mode="a")
        state = {
            "identity": json.dumps(self.identity),
            "rows": self.rows_written,
            "progress": run.progress(),
        }
        partial = self.state_path.with_suffix(".pt.partial")
        torch.save(state, partial)
        os.replace(partial, self.state_path)  # atomic: the old state or the new one

    def finish(self) -> None:
        """The run is complete (its files are written): nothing is left to continue."""
        self.state_path.unlink(missing_ok=True)
