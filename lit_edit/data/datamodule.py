"""The LightningDataModule for edit data (ZsRE, CounterFact, KnowEdit, WISE files)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from lit_edit.data.arrow import ArrowRecords, read_records_arrow
from lit_edit.data.collate import collate_records
from lit_edit.data.detect import reader_by_name, record_readers
from lit_edit.data.global_order import GlobalOrderSampler
from lit_edit.data.reading import ReadResult, read_records
from lit_edit.data.resumable import ResumableLoader
from lit_edit.data.split import check_fractions, split_indices, subsample
from lit_edit.data.transfer import move_batch_to_device
from lit_edit.records import EditRecord
from lit_edit.sharding import ShardSampler


class EditDataModule(LightningDataModule):
    """Edit records for training and evaluating editors, read from data files.

    The splits come either from one file per split (``train_path``, ``val_path``,
    ``test_path``), or from a single file (``path``) split with seeded fractions. The format of
    each file is detected from its first record unless ``format`` is given. Batches are lists of
    :class:`~lit_edit.records.EditRecord`; methods tokenize them in their
    ``on_before_batch_transfer`` (e.g. with :class:`~lit_edit.data.collate.EditCollator`).

    Subclasses that produce records another way override :meth:`load_records`.

    Args:
        train_path: File of the training split (``.json`` or ``.jsonl``).
        val_path: File of the validation split.
        test_path: File of the test (editing) split.
        path: A single file split into train/val/test with ``val_fraction``, ``test_fraction``
            and ``split_seed``; cannot be combined with the per-split paths.
        val_fraction: Fraction of ``path`` used for validation.
        test_fraction: Fraction of ``path`` used for test; train gets the rest.
        split_seed: Seed of the split of ``path`` and of the ``max_*_records`` subsamples.
        format: Data format of every file (``zsre``, ``counterfact``, ``counterfact_rome``,
            ``knowedit``, ``wise``); detected from each file's first record when not given.
        skip_invalid: Leave invalid records out (each one is logged) instead of failing on the
            first one.
        max_train_records: Keep at most this many training records (seeded subsample).
        max_val_records: Keep at most this many validation records (seeded subsample).
        max_test_records: Keep at most this many test records (seeded subsample).
        subsample: How the ``max_*_records`` limits choose: ``"seeded"`` (a random sample seeded
            by ``split_seed``, in file order) or ``"first"`` (the first records of the split, as
            ``ds[:N]`` in EasyEdit's scripts).
        batch_size: Records per training batch.
        eval_batch_size: Records per validation/test batch (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        shuffle_seed: Seed of the training-order shuffle.
        backend: How files are read: ``"json"`` (decoded into a list of records) or
            ``"datasets"`` (Hugging Face ``datasets``: an Arrow table cached on disk and
            memory-mapped, records built from their row on access; also reads ``.parquet``
            files and hub datasets named ``hf://ORG/NAME:SPLIT``). Both give the same records,
            in the same order, with the same validation errors and subsamples.
        datasets_cache_dir: Where the ``datasets`` backend keeps its tables (default:
            ``HF_DATASETS_CACHE``).

    Attributes:
        records: Split name → records, filled by :meth:`setup`.
        read_results: What reading each file gave (key: the split, or ``"path"``), with the
            skipped records and dropped values.
        prepared_splits: The splits :meth:`setup` has been asked for so far.
        test_shard_unit: Consecutive test records kept on one process when the test records
            are sharded across processes (see :meth:`shard_test_records`).
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        path: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        format: str | None = None,
        skip_invalid: bool = False,
        max_train_records: int | None = None,
        max_val_records: int | None = None,
        max_test_records: int | None = None,
        subsample: Literal["seeded", "first"] = "seeded",
        batch_size: int = 1,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int = 0,
        backend: Literal["json", "datasets"] = "json",
        datasets_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if path is not None and any(p is not None for p in (train_path, val_path, test_path)):
            raise ValueError("give either `path` (split by fractions) or per-split paths, not both")
        check_fractions(val_fraction, test_fraction)
        if subsample not in ("seeded", "first"):
            raise ValueError(f"subsample must be 'seeded' or 'first', got {subsample!r}")
        if backend not in ("json", "datasets"):
            raise ValueError(f"backend must be 'json' or 'datasets', got {backend!r}")
        if format is not None:
            reader_by_name(format, record_readers())
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name, value in (
            ("max_train_records", max_train_records),
            ("max_val_records", max_val_records),
            ("max_test_records", max_test_records),
        ):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.save_hyperparameters()
        self.paths = {"train": train_path, "val": val_path, "test": test_path}
        self.path = path
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.format = format
        self.skip_invalid = skip_invalid
        self.max_records = {
            "train": max_train_records,
            "val": max_val_records,
            "test": max_test_records,
        }
        self.subsample = subsample
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self.backend = backend
        self.datasets_cache_dir = datasets_cache_dir
        self.records: dict[str, Sequence[EditRecord]] = {}
        self.read_results: dict[str, ReadResult[EditRecord]] = {}
        self.prepared_splits: set[str] = set()
        self.test_shard_unit = 1

    @staticmethod
    def splits_for_stage(stage: str) -> tuple[str, ...]:
        """The splits a Trainer stage uses (``fit``: train and val; ``test``/``predict``: test).

        Raises:
            ValueError: for an unknown stage.
        """
        if stage == "fit":
            return ("train", "val")
        if stage == "validate":
            return ("val",)
        if stage in ("test", "predict"):
            return ("test",)
        raise ValueError(f"unknown stage {stage!r}; expected fit, validate, test or predict")

    def load_records(self, stage: str) -> dict[str, Sequence[EditRecord]]:
        """Read the records of the splits ``stage`` uses.

        Override this in a subclass that produces records another way; :meth:`setup` applies the
        ``max_*_records`` limits and checks the needed split afterwards.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.

        Returns:
            Split name → records, for the splits of the stage that have a source.
        """
        wanted = self.splits_for_stage(stage)
        if self.path is not None:
            records = self._read(self.path, "path").records
            indices = split_indices(
                len(records), self.val_fraction, self.test_fraction, self.split_seed
            )
            return {s: take(records, indices[s]) for s in wanted}
        return {s: self._read(p, s).records for s in wanted if (p := self.paths[s]) is not None}

    def prepare_data(self) -> None:
        """Build the ``datasets`` backend's table caches and validations (once per machine).

        Lightning calls it on one process per machine before the others start ``setup``: they
        then open the caches and the kept validations (an invalid record raises here already).
        """
        if self.backend != "datasets":
            return
        for path in (self.path, *self.paths.values()):
            if path is not None:
                read_records_arrow(path, self.format, self.skip_invalid,
                                   self.datasets_cache_dir, log=False)

    def _read(self, path: str, key: str) -> ReadResult[EditRecord]:
        if self.backend == "datasets":
            result = read_records_arrow(path, self.format, self.skip_invalid,
                                        self.datasets_cache_dir)
        else:
            result = read_records(path, self.format, self.skip_invalid)
        self.read_results[key] = result
        return result

    def setup(self, stage: str) -> None:
        """Load the stage's splits, apply the ``max_*_records`` limits, check the needed split.

        Raises:
            ValueError: if the split the stage needs (train for ``fit``, val for ``validate``,
                test for ``test``/``predict``) has no records.
        """
        logger = logging.getLogger(__name__)
        for split, records in self.load_records(stage).items():
            kept = take(records, subsample(range(len(records)), self.max_records.get(split),
                                           self.split_seed, split, self.subsample))
            if len(kept) < len(records):
                how, seed = (("the first", "") if self.subsample == "first"
                             else ("a seeded sample of", f", seed {self.split_seed}"))
                logger.info("%s split: kept %s %d of %d records (max_%s_records%s)",
                            split, how, len(kept), len(records), split, seed)
            logger.info("%s split: %d records", split, len(kept))
            self.records[split] = kept
        self.prepared_splits.update(self.splits_for_stage(stage))
        self._split(self.splits_for_stage(stage)[0], stage)

    def missing_split_hint(self, split: str) -> str:
        """How to give ``split`` a source; ends the error raised when it has no records.

        Subclasses that do not read files (e.g. TinyFacts) override it to name their own
        arguments.
        """
        if self.path is None:
            return f"set {split}_path, or `path` with fractions"
        if split == "train":
            return "`path` leaves no training records: lower val_fraction/test_fraction"
        return f"set {split}_fraction > 0 (with `path`) or use {split}_path"

    def _split(self, split: str, stage: str | None = None) -> Sequence[EditRecord]:
        records = self.records.get(split)
        if records:
            return records
        hint = self.missing_split_hint(split)
        if split not in self.prepared_splits:
            hint = f"call setup() for a stage that uses it first, or {hint}"
        when = f" (stage {stage!r})" if stage else ""
        raise ValueError(f"{type(self).__name__} has no {split} records{when}: {hint}")

    def shard_test_records(self, unit: int) -> None:
        """Shard the test records across processes in runs of ``unit`` consecutive records.

        The test loader gives each process of a multi-process run one contiguous slice of the
        test records, every record exactly once, slice boundaries on multiples of ``unit``
        (:class:`~lit_edit.sharding.ShardSampler`); the editing protocol's groups need it
        (:attr:`~lit_edit.protocols.EditingProtocol.shard_unit`, handed over by
        :func:`~lit_edit.links.connect`).

        Raises:
            ValueError: if ``unit < 1``.
        """
        if unit < 1:
            raise ValueError(f"the shard unit must be >= 1, got {unit}")
        self.test_shard_unit = unit

    def _loader(self, split: str, shuffle: bool, shard: bool = False) -> DataLoader[Any]:
        generator = None
        if shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.shuffle_seed)
        records = self._split(split)
        sampler: Sampler[int] | None = (
            ShardSampler(len(records), self.test_shard_unit) if shard else None
        )
        trainer = self.trainer
        if shuffle and trainer is not None and trainer.world_size > 1:
            # the one-process order dealt out to the processes (not Lightning's own shuffle)
            sampler = GlobalOrderSampler(len(records), self.shuffle_seed,
                                         trainer.world_size, trainer.global_rank)
        loader = ResumableLoader if split == "train" else DataLoader
        return loader(
            records,  # type: ignore[arg-type]
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            generator=generator,
            collate_fn=collate_records,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled (seeded with ``shuffle_seed``) batches of training records.

        With several processes each takes its share of the one-process order
        (:class:`~lit_edit.data.global_order.GlobalOrderSampler`), so ``W`` processes with
        batch ``B`` train on the records of one process accumulating ``W`` batches of ``B``.

        The loader's position in the epoch goes into the checkpoints
        (:class:`~lit_edit.data.resumable.ResumableLoader`): ``fit --ckpt_path`` continues the
        epoch where the checkpoint was taken.
        """
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        """Batches of validation records, in file order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        """Batches of test records, in file order; this process's shard in a multi-process run.

        The shard is contiguous and nothing is padded
        (:class:`~lit_edit.sharding.ShardSampler`): Lightning leaves the sampler as it is.
        """
        return self._loader("test", shuffle=False, shard=True)

    def predict_dataloader(self) -> DataLoader[Any]:
        """The test records (same as :meth:`test_dataloader`)."""
        return self._loader("test", shuffle=False)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """Move a batch's tensors to ``device``, leaving its records as they are.

        Lightning's default fails on frozen dataclasses such as ``EditRecord``; see
        :func:`~lit_edit.data.transfer.move_batch_to_device`.
        """
        return move_batch_to_device(batch, device)


def take(records: Sequence[EditRecord], indices: Sequence[int]) -> Sequence[EditRecord]:
    """The records at ``indices``, in that order: a list, or a lazy subset of ``ArrowRecords``.

    Args:
        records: A split's records.
        indices: Positions in ``records``.
    """
    if isinstance(records, ArrowRecords):
        return records if len(indices) == len(records) else records.select(indices)
    return [records[i] for i in indices]
