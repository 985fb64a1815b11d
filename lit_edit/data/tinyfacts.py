"""The TinyFacts DataModule: edit records of the embedded default world, split by subject."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lit_edit.data.datamodule import EditDataModule
from lit_edit.records import EditRecord

if TYPE_CHECKING:
    from lit_edit.world.generator import World


def load_tinyfacts_world(world: str) -> World:
    """Load a TinyFacts world.

    Args:
        world: A model name (``"tinyfacts"``, ``"tinyfacts-llama"``; built and cached on first
            use) or a built model directory holding ``world.json``.
    """
    from lit_edit.world import load_world, resolve_tinyfacts

    path = Path(world)
    return load_world(path if path.is_dir() else resolve_tinyfacts(world))


class TinyFactsDataModule(EditDataModule):
    """Edit records of a TinyFacts world, split into train/val/test with disjoint subjects.

    The world is the one the backbone was pretrained on: ``world`` names the model
    (``"tinyfacts"``, ``"tinyfacts-llama"`` or a built model directory holding ``world.json``).
    Every fact of the chosen relations becomes an edit record (seeded new target of the same type,
    held-out phrasings as rephrases, two-hop and alias questions as portability, other subjects'
    facts as locality); subjects are shuffled with ``split_seed`` and assigned to the splits, so
    meta-training never sees a test subject.

    Args:
        world: Model name or directory whose world to use.
        n_train: Training records (``None``: all that remain after val and test).
        n_val: Validation records.
        n_test: Test (editing) records.
        relations: Relations to edit (default: every relation of the world).
        n_locality: Locality pairs per record.
        record_seed: Seed of the new targets and locality choices (and of the fresh names).
        fresh_subjects: Move every record onto a fresh invented subject after the split (see
            :func:`~lit_edit.world.fresh.with_fresh_subjects`): facts about names the model never
            saw, answerable only by reading them; for LTE alignment data.
        split_seed: Seed of the subject split.
        batch_size: Records per training batch.
        eval_batch_size: Records per validation/test batch (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        shuffle_seed: Seed of the training-order shuffle.
    """

    def __init__(
        self,
        world: str = "tinyfacts",
        n_train: int | None = None,
        n_val: int = 100,
        n_test: int = 200,
        relations: list[str] | None = None,
        n_locality: int = 3,
        record_seed: int = 0,
        split_seed: int = 0,
        batch_size: int = 1,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int = 0,
        fresh_subjects: bool = False,
    ) -> None:
        super().__init__(
            split_seed=split_seed,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            shuffle_seed=shuffle_seed,
        )
        for name, value in (("n_val", n_val), ("n_test", n_test), ("n_train", n_train)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.world = world
        self.n_train = n_train
        self.n_val = n_val
        self.n_test = n_test
        self.relations = relations
        self.n_locality = n_locality
        self.record_seed = record_seed
        self.fresh_subjects = fresh_subjects

    def _world(self) -> World:
        return load_tinyfacts_world(self.world)

    def all_records(self, world: World | None = None) -> list[EditRecord]:
        """Every edit record of the world (all facts of the chosen relations), real subjects.

        Args:
            world: The loaded world (default: load it from ``world``).
        """
        world = world or self._world()
        return world.edit_records(
            None, seed=self.record_seed, relations=self.relations, n_locality=self.n_locality
        )

    def missing_split_hint(self, split: str) -> str:
        """Name the argument that sizes ``split``."""
        return f"set n_{split} > 0"

    def load_records(self, stage: str) -> dict[str, list[EditRecord]]:
        """Split the world's records by subject into the splits ``stage`` needs."""
        world = self._world()
        splits = split_by_subject(
            self.all_records(world),
            {"test": self.n_test, "val": self.n_val, "train": self.n_train},
            self.split_seed,
        )
        out = {name: splits[name] for name in self.splits_for_stage(stage)}
        if self.fresh_subjects:
            from lit_edit.world.fresh import with_fresh_subjects

            out = {
                name: with_fresh_subjects(world, records, f"{self.record_seed}/{name}")
                for name, records in out.items()
            }
        return out


def split_by_subject(
    records: Sequence[EditRecord], sizes: dict[str, int | None], seed: int
) -> dict[str, list[EditRecord]]:
    """Split records into named splits whose subjects are disjoint.

    Subjects are shuffled with ``seed``; each split, in the order of ``sizes``, takes whole
    subjects until it has its size (it may exceed it by at most one subject's records, which are
    trimmed). A size of ``None`` takes every remaining subject.

    Args:
        records: Records with a ``subject``.
        sizes: Split name -> number of records (``None``: the rest), in filling order.
        seed: Shuffle seed.

    Returns:
        Split name -> records (in the records' original order within each split).

    Raises:
        ValueError: if there are not enough records for the requested sizes.
    """
    by_subject: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_subject.setdefault(r.subject or f"#{i}", []).append(i)
    subjects = sorted(by_subject)
    random.Random(seed).shuffle(subjects)
    out: dict[str, list[EditRecord]] = {}
    cursor = 0
    for name, size in sizes.items():
        chosen: list[int] = []
        while cursor < len(subjects) and (size is None or len(chosen) < size):
            chosen.extend(by_subject[subjects[cursor]])
            cursor += 1
        if size is not None:
            if len(chosen) < size:
                raise ValueError(
                    f"split {name!r} needs {size} records but only {len(chosen)} remain "
                    f"(of {len(records)})"
                )
            chosen = chosen[:size]
        out[name] = [records[i] for i in sorted(chosen)]
    return out
