"""The LTE DataModule: alignment samples for ``fit``, edit records for ``test``."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lit_edit.data.datamodule import EditDataModule
from lit_edit.data.lte_parallel import ParallelDataBuilder, sample_stats
from lit_edit.data.reading import read_conversations
from lit_edit.data.resumable import ResumableLoader
from lit_edit.data.tinyfacts import load_tinyfacts_world
from lit_edit.links import Answerer
from lit_edit.nn.retrieval import DEFAULT_ENCODER, Encoder, load_encoder
from lit_edit.records import EditRecord, QAPair
from lit_edit.sampling import BucketBatches, BucketShareSampler, LengthBucketSampler

log = logging.getLogger(__name__)


def _collate_pairs(batch: list[QAPair]) -> list[QAPair]:
    return list(batch)


def _conversation_pairs(path: str | Path) -> list[QAPair]:
    """The (human turn, answer) pairs of a FastChat/LTE conversations file."""
    return [QAPair(c.prompt, c.answer) for c in read_conversations(path).records]


class LTEDataModule(LightningDataModule):
    """LTE alignment data for ``fit`` and edit records for ``test``, from one config.

    ``fit`` trains on (human turn, answer) pairs: read from LTE/FastChat files
    (``train_conversations``, ``val_conversations``) or, when a split has no file, built from the
    matching split of ``edits`` with :class:`~lit_edit.data.lte_parallel.ParallelDataBuilder`.
    ``test`` serves the test records of ``edits`` (the editing protocol). Batches are lists of
    :class:`~lit_edit.records.QAPair` (prompt = the human turn, before chat wrapping); the editor
    wraps and tokenizes them, exactly as it does at evaluation.

    Args:
        edits: Edit records (e.g. ``TinyFactsDataModule`` or an ``EditDataModule`` on ZsRE,
            CounterFact or KnowEdit files): train/val splits to build alignment data from, and the
            test split to edit.
        train_edits: More edit data for the alignment samples only: the train split of each is
            built like ``edits``' (edited samples only; the unedited twins would repeat). E.g. the
            same TinyFacts world and split with other ``record_seed`` s: new targets for the same
            facts, so that the model learns to read the fact rather than memorise answers.
        train_conversations: FastChat/LTE training file (``LTE_train_data.json`` format).
        val_conversations: FastChat/LTE validation file.
        encoder: Sentence encoder of the nearest-neighbour distractors (``"hashing"`` for a
            model-free lexical one).
        fact_counts: Probabilities of 1, 2 and 3 facts in a fact list.
        n_neighbours: Nearest other facts distractors are drawn from.
        true_fact_first: The record's own fact first in every fact list (the paper); ``False``:
            at a seeded random place (see :class:`~lit_edit.data.lte_parallel.ParallelDataBuilder`).
        max_in_scope: Most in-scope questions per record (``None``: all).
        max_out_of_scope: Most out-of-scope (locality) questions per record (``None``: all).
        out_of_scope_groups: Locality groups out-of-scope questions are drawn from (``None``:
            all; e.g. ``["other_relation"]``: TinyFacts questions about the edited subject).
        unedited_twins: Also train on the questions without facts.
        replay: Mix (prompt, answer) pairs the model already knows into the training samples,
            bare and with the answer-only loss, so that alignment keeps its knowledge: a TinyFacts
            world (a model name like ``"tinyfacts"`` or a built model directory: its pretraining
            pairs), or a FastChat/LTE conversations file (``.json``/``.jsonl``) of such pairs
            for other models. Without it, full fine-tuning of the tiny model forgets most facts
            of the subjects it is not aligned on (README, LTE). ``None``: no replay.
        max_replay: Most replay pairs (seeded subsample; ``None``: all).
        unedited_answers: Where the unedited answers of portability questions come from:
            ``"dataset"`` (none: no portability twin) or ``"model"`` (greedy answers of the
            editor's backbone before alignment, via its ``unedited_answers`` method).
        seed: Seed of the builder's choices.
        max_val_samples: Most validation samples (seeded subsample; ``None``: all).
        batch_size: Samples per training batch.
        eval_batch_size: Samples per validation batch (default: ``batch_size``); test batches
            are sized by ``edits``.
        num_workers: DataLoader worker processes.
        shuffle_seed: Seed of the training order.
    """

    def __init__(
        self,
        edits: EditDataModule | None = None,
        train_edits: list[EditDataModule] | None = None,
        train_conversations: str | None = None,
        val_conversations: str | None = None,
        encoder: str = DEFAULT_ENCODER,
        fact_counts: list[float] | None = None,
        n_neighbours: int = 5,
        true_fact_first: bool = True,
        max_in_scope: int | None = None,
        max_out_of_scope: int | None = None,
        out_of_scope_groups: list[str] | None = None,
        unedited_twins: bool = True,
        unedited_answers: Literal["dataset", "model"] = "dataset",
        replay: str | None = None,
        max_replay: int | None = None,
        seed: int = 0,
        max_val_samples: int | None = 2000,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        if edits is None and train_conversations is None:
            raise ValueError("give `edits` (to build alignment data) or `train_conversations`")
        if unedited_answers not in ("dataset", "model"):
            raise ValueError(
                f"unedited_answers must be 'dataset' or 'model', got {unedited_answers!r}"
            )
        self.edits = edits
        self.train_edits = list(train_edits or [])
        self.paths = {"train": train_conversations, "val": val_conversations}
        self.encoder = encoder
        self.fact_counts = list(fact_counts) if fact_counts is not None else [0.5, 0.25, 0.25]
        self.n_neighbours = n_neighbours
        self.true_fact_first = true_fact_first
        self.max_in_scope = max_in_scope
        self.max_out_of_scope = max_out_of_scope
        self.out_of_scope_groups = out_of_scope_groups
        self.unedited_twins = unedited_twins
        self.unedited_answers = unedited_answers
        self.replay = replay
        self.max_replay = max_replay
        self.seed = seed
        self.max_val_samples = max_val_samples
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self.samples: dict[str, list[QAPair]] = {}
        self._encoder: Encoder | None = None
        self._answerer: Answerer | None = None

    def answer_with(self, answerer: Answerer) -> None:
        """Take the unedited model's answers for ``unedited_answers: model``.

        :func:`lit_edit.links.connect` calls it (``train.py`` does, once both are built).

        Args:
            answerer: Questions to the model's greedy answers, in order.
        """
        self._answerer = answerer

    def builder(self, primary: bool = True) -> ParallelDataBuilder:
        """The parallel-data builder these settings describe (``primary``: for ``edits``)."""
        answerer = None
        if self.unedited_answers == "model" and primary:
            answerer = self._answerer
            if answerer is None:
                raise ValueError(
                    "unedited_answers='model' needs the unedited model's answers: train.py hands "
                    "them over; from Python call lit_edit.links.connect(editor, data) (or "
                    "data.answer_with(editor.unedited_answers)) before Trainer.fit"
                )
        if self._encoder is None:
            self._encoder = load_encoder(self.encoder)
        return ParallelDataBuilder(
            encoder=self._encoder,
            fact_counts=self.fact_counts,
            n_neighbours=self.n_neighbours,
            true_fact_first=self.true_fact_first,
            seed=self.seed,
            max_in_scope=self.max_in_scope,
            max_out_of_scope=self.max_out_of_scope,
            out_of_scope_groups=self.out_of_scope_groups,
            unedited_twins=self.unedited_twins and primary,
            unedited_answers=answerer,
        )

    def _split_samples(self, split: str) -> list[QAPair]:
        path = self.paths[split]
        if path is not None:
            pairs = _conversation_pairs(path)
            log.info("%s: %d alignment samples from %s", split, len(pairs), path)
            return pairs
        sources = [(self.edits, True)] if self.edits is not None else []
        if split == "train":
            sources += [(extra, False) for extra in self.train_edits]
        pairs: list[QAPair] = []
        for edits, primary in sources:
            records = edits.records.get(split, [])
            if not records:
                continue
            samples = self.builder(primary).build(records)
            log.info(
                "%s: %d alignment samples from %d edit records %s",
                split, len(samples), len(records), sample_stats(samples),
            )
            pairs += [QAPair(s.human, s.answer) for s in samples]
        return pairs

    def edit_records(self, split: str) -> list[EditRecord]:
        """The records of a split of ``edits`` after ``setup``.

        Empty without ``edits`` or when the alignment data comes from conversations files.
        """
        if self.edits is None or self.paths["train"] is not None:
            return []
        return list(self.edits.records.get(split, []))

    def replay_samples(self) -> list[QAPair]:
        """The :attr:`replay` pairs (a seeded subsample of ``max_replay``).

        Raises:
            DataFileError: for an invalid conversations file.
            ValueError: for a name that is neither a file nor a TinyFacts model.
        """
        if self.replay is None:
            return []
        path = Path(self.replay)
        if path.is_file():
            pairs = _conversation_pairs(path)
            source = f"conversations file {path}"
        else:
            try:
                world = load_tinyfacts_world(self.replay)
            except ValueError as err:
                raise ValueError(
                    f"replay={self.replay!r} is neither a conversations file nor a TinyFacts "
                    f"model: {err}"
                ) from err
            pairs = [QAPair(p.prompt, p.answer) for p in world.pretraining_pairs()]
            source = f"the pretraining text of {self.replay}"
        if self.max_replay is not None and len(pairs) > self.max_replay:
            pairs = random.Random(self.seed).sample(pairs, self.max_replay)
        log.info("train: %d replay pairs from %s", len(pairs), source)
        return pairs

    def setup(self, stage: str) -> None:
        """Build or read the alignment samples (``fit``), or prepare the test records."""
        if stage in ("fit", "validate"):
            if self.edits is not None and self.paths["train"] is None:
                self.edits.setup(stage)  # alignment data built from the edit records
            if stage == "fit" and self.paths["train"] is None:
                for extra in self.train_edits:
                    extra.setup(stage)
            splits = ("train", "val") if stage == "fit" else ("val",)
            for split in splits:
                self.samples[split] = self._split_samples(split)
            if stage == "fit":
                self.samples["train"] += self.replay_samples()
            val = self.samples.get("val", [])
            if self.max_val_samples is not None and len(val) > self.max_val_samples:
                self.samples["val"] = random.Random(self.seed).sample(val, self.max_val_samples)
            if stage == "fit" and not self.samples["train"]:
                raise ValueError("LTEDataModule has no training samples")
        else:
            if self.edits is None:
                raise ValueError(f"stage {stage!r} edits records: set `edits`")
            self.edits.setup(stage)

    def train_dataloader(self) -> DataLoader[Any]:
        """Length-bucketed, seeded batches of training samples.

        The loader's position in the epoch goes into the checkpoints
        (:class:`~lit_edit.data.resumable.ResumableLoader`), the epoch's order comes from the
        epoch number (:meth:`~lit_edit.sampling.LengthBucketSampler.set_epoch`): ``fit
        --ckpt_path`` continues the epoch where the checkpoint was taken.
        """
        samples = self.samples["train"]
        lengths = [len(s.prompt) + len(s.answer) for s in samples]
        buckets = LengthBucketSampler(lengths, self.batch_size, self.shuffle_seed)
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:  # whole one-process batches per rank
            batches = BucketBatches(samples, buckets)
            return ResumableLoader(
                batches,  # type: ignore[arg-type]
                batch_size=None,
                sampler=BucketShareSampler(batches, trainer.world_size, trainer.global_rank),
                collate_fn=_collate_pairs,
                num_workers=self.num_workers,
            )
        return ResumableLoader(
            samples,  # type: ignore[arg-type]
            batch_sampler=buckets,
            collate_fn=_collate_pairs,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        """Batches of validation samples (empty when there are none)."""
        return DataLoader(
            self.samples.get("val", []),  # type: ignore[arg-type]
            batch_size=self.eval_batch_size,
            collate_fn=_collate_pairs,
            num_workers=self.num_workers,
        )

    def shard_test_records(self, unit: int) -> None:
        """Shard the test records of ``edits`` in runs of ``unit`` consecutive records.

        See :meth:`~lit_edit.data.datamodule.EditDataModule.shard_test_records`.
        """
        if self.edits is not None:
            self.edits.shard_test_records(unit)

    def test_dataloader(self) -> DataLoader[Any]:
        """The test edit records of ``edits``."""
        assert self.edits is not None
        return self.edits.test_dataloader()
