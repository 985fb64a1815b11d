"""EditDataModule: seeded splits, limits, batches of records, errors, and a real Trainer run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from test_data_samples import DATA, needs_data, write_json, zsre_raw
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lit_edit.data import EditCollator, EditDataModule
from lit_edit.records import DataFileError, EditRecord


def zsre_file(path: Path, n: int, bad: tuple[int, ...] = ()) -> Path:
    raws = [zsre_raw(alt="" if i in bad else f"A{i}") for i in range(n)]
    return write_json(path, raws)


def indices(records: list[EditRecord]) -> list[int]:
    return [r.index for r in records]


@pytest.fixture
def data50(tmp_path: Path) -> Path:
    return zsre_file(tmp_path / "z50.json", 50)


def split_of(path: Path, **kwargs: Any) -> dict[str, list[int]]:
    dm = EditDataModule(path=str(path), **kwargs)
    dm.setup("fit")
    dm.setup("test")
    return {s: indices(dm.records[s]) for s in ("train", "val", "test")}


# --- splits ---------------------------------------------------------------------------------


def test_path_split_is_disjoint_covering_and_sized(data50: Path) -> None:
    split = split_of(data50, val_fraction=0.2, test_fraction=0.1, split_seed=1)
    assert [len(split[s]) for s in ("train", "val", "test")] == [35, 10, 5]
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(50))
    assert all(v == sorted(v) for v in split.values())  # file order kept inside a split


def test_path_split_is_reproducible_and_seeded(data50: Path) -> None:
    a = split_of(data50, split_seed=3)
    assert split_of(data50, split_seed=3) == a
    assert split_of(data50, split_seed=4) != a
    assert [len(a[s]) for s in ("train", "val", "test")] == [40, 5, 5]  # defaults 0.1 / 0.1


def test_per_split_paths(tmp_path: Path) -> None:
    train = zsre_file(tmp_path / "train.json", 7)
    test = zsre_file(tmp_path / "test.jsonl.json", 3)
    dm = EditDataModule(train_path=str(train), test_path=str(test))
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.records["train"]), len(dm.records["test"])) == (7, 3)
    assert "val" not in dm.records
    assert dm.records["test"][0].source == str(test)


def test_max_records_are_seeded_subsamples_and_reported(
    data50: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lit_edit.data.datamodule"):
        dm = EditDataModule(train_path=str(data50), max_train_records=8, split_seed=5)
        dm.setup("fit")
    kept = indices(dm.records["train"])
    assert len(kept) == 8 and kept == sorted(kept) and kept != list(range(8))
    assert "kept a seeded sample of 8 of 50 records" in caplog.text
    again = EditDataModule(train_path=str(data50), max_train_records=8, split_seed=5)
    again.setup("fit")
    assert indices(again.records["train"]) == kept
    other = EditDataModule(train_path=str(data50), max_train_records=8, split_seed=6)
    other.setup("fit")
    assert indices(other.records["train"]) != kept


def test_max_records_first_keeps_the_first_records_of_the_split(
    data50: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lit_edit.data.datamodule"):
        dm = EditDataModule(train_path=str(data50), max_train_records=8, subsample="first",
                            split_seed=5)
        dm.setup("fit")
    assert indices(dm.records["train"]) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert "kept the first 8 of 50 records (max_train_records)" in caplog.text
    with pytest.raises(ValueError, match="subsample must be 'seeded' or 'first', got 'last'"):
        EditDataModule(train_path=str(data50), subsample="last")  # type: ignore[arg-type]


def test_limits_apply_after_the_path_split(data50: Path) -> None:
    full = split_of(data50, split_seed=2)
    limited = split_of(data50, split_seed=2, max_test_records=2, max_val_records=100)
    assert set(limited["test"]) < set(full["test"]) and len(limited["test"]) == 2
    assert limited["val"] == full["val"] and limited["train"] == full["train"]


# --- batches --------------------------------------------------------------------------------


def test_batches_are_lists_of_records(data50: Path) -> None:
    dm = EditDataModule(path=str(data50), batch_size=4, eval_batch_size=3, shuffle_seed=0)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert all(isinstance(b, list) and all(isinstance(r, EditRecord) for r in b) for b in train)
    assert [len(b) for b in train] == [4] * 10
    assert sorted(r.index for b in train for r in b) == indices(dm.records["train"])
    val = list(dm.val_dataloader())
    assert [len(b) for b in val] == [3, 2]
    assert [r.index for b in val for r in b] == indices(dm.records["val"])  # not shuffled


def test_batches_from_worker_processes(data50: Path) -> None:
    dm = EditDataModule(train_path=str(data50), batch_size=25, num_workers=1)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sorted(r.index for b in batches for r in b) == list(range(50))
    assert batches[0][0] in dm.records["train"]  # records survive pickling intact


def test_training_order_is_seeded(data50: Path) -> None:
    def order(seed: int) -> list[int]:
        dm = EditDataModule(train_path=str(data50), batch_size=5, shuffle_seed=seed)
        dm.setup("fit")
        return [r.index for b in dm.train_dataloader() for r in b]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(50))


# --- errors ---------------------------------------------------------------------------------


def test_missing_splits_give_clear_errors(data50: Path) -> None:
    dm = EditDataModule(train_path=str(data50))
    with pytest.raises(ValueError, match="no train records: call setup"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match=r"no test records \(stage 'test'\): set test_path"):
        dm.setup("test")
    dm.setup("fit")
    with pytest.raises(ValueError, match="no val records: set val_path"):
        dm.val_dataloader()
    with pytest.raises(ValueError, match="no train records"):
        EditDataModule(test_path=str(data50)).setup("fit")
    no_val = EditDataModule(path=str(data50), val_fraction=0.0)
    no_val.setup("fit")
    with pytest.raises(ValueError, match="set val_fraction > 0"):
        no_val.val_dataloader()
    all_test = EditDataModule(path=str(data50), val_fraction=0.0, test_fraction=1.0)
    with pytest.raises(ValueError, match="leaves no training records"):
        all_test.setup("fit")
    all_test.setup("test")
    assert len(all_test.records["test"]) == 50


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"path": "a.json", "train_path": "b.json"}, "either `path`"),
        ({"val_fraction": 1.5}, r"val_fraction must be in \[0, 1\]"),
        ({"val_fraction": 0.6, "test_fraction": 0.6}, "at most 1"),
        ({"format": "zsre2"}, "unknown data format 'zsre2'"),
        ({"format": "lte"}, "unknown data format 'lte'"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"max_val_records": -1}, "max_val_records must be >= 0"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EditDataModule(**kwargs)


def test_unknown_stage(data50: Path) -> None:
    with pytest.raises(ValueError, match="unknown stage"):
        EditDataModule(path=str(data50)).setup("tune")


def test_invalid_records_fail_or_are_skipped_and_kept_in_the_report(tmp_path: Path) -> None:
    path = zsre_file(tmp_path / "bad.json", 10, bad=(2, 7))
    with pytest.raises(DataFileError, match="record 2, field 'alt'"):
        EditDataModule(train_path=str(path)).setup("fit")
    dm = EditDataModule(train_path=str(path), skip_invalid=True)
    dm.setup("fit")
    assert len(dm.records["train"]) == 8
    assert dm.read_results["train"].skipped_indices == [2, 7]


def test_forced_format_is_used(data50: Path) -> None:
    with pytest.raises(DataFileError, match="field 'prompt'"):
        EditDataModule(train_path=str(data50), format="counterfact").setup("fit")


# --- extension point and configuration ------------------------------------------------------


class GeneratedDataModule(EditDataModule):
    """A subclass that makes its records instead of reading files (like TinyFacts)."""

    def load_records(self, stage: str) -> dict[str, list[EditRecord]]:
        made = [EditRecord(f"Q{i} is", f"A{i}", index=i) for i in range(12)]
        return {s: made for s in self.splits_for_stage(stage)}

    def missing_split_hint(self, split: str) -> str:
        return f"raise n_{split}"


def test_subclass_overrides_load_records() -> None:
    dm = GeneratedDataModule(max_val_records=3, batch_size=6)
    dm.setup("fit")
    assert len(dm.records["train"]) == 12 and len(dm.records["val"]) == 3
    assert [len(b) for b in dm.train_dataloader()] == [6, 6]
    with pytest.raises(ValueError, match=r"GeneratedDataModule has no test records.*raise n_test"):
        GeneratedDataModule(max_test_records=0).setup("test")


def test_docstring_is_the_cli_help_and_hparams_are_saved() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(EditDataModule, "data")
    text = " ".join(parser.format_help().split())
    assert "--data.train_path TRAIN_PATH File of the training split" in text
    assert "Seed of the training-order shuffle" in text
    dm = EditDataModule(path="x.json", batch_size=4)
    assert dm.hparams["batch_size"] == 4 and dm.hparams["path"] == "x.json"


@needs_data
def test_shared_zsre_files() -> None:
    dm = EditDataModule(
        train_path=str(DATA / "zsre/zsre_mend_train-1k.json"),
        val_path=str(DATA / "zsre/zsre_mend_eval_portability_gpt4.json"),
        skip_invalid=True,
        max_val_records=100,
    )
    dm.setup("fit")
    assert len(dm.records["train"]) == 998 and len(dm.records["val"]) == 100
    assert dm.read_results["train"].skipped_indices == [534, 723]
    assert len(dm.read_results["val"].records) == 1037


# --- a real Trainer run: records survive Lightning's batch transfer --------------------------


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Which country is Paris in? Italy"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


class RecordingModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.collator = EditCollator(tiny_tokenizer(), padding_side="left")
        self.seen: list[list[int]] = []

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.collator(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.append([r.index for r in batch["records"]])
        labels = batch["edit"]["labels"]
        return self.weight * (labels != -100).sum()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.seen.append([r.index for r in batch["records"]])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_default_transfer_fails_on_records() -> None:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    with pytest.raises(ValueError, match="frozen dataclass"):
        move_data_to_device([EditRecord("a b", "c")], torch.device("cpu"))


def test_trainer_fit_and_test_with_record_batches(data50: Path) -> None:
    dm = EditDataModule(path=str(data50), batch_size=4, val_fraction=0.0, test_fraction=0.2)
    model = RecordingModule()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert [len(b) for b in model.seen] == [4, 4, 4]
    model.seen.clear()
    trainer.test(model, datamodule=dm, verbose=False)
    assert [i for b in model.seen for i in b] == indices(dm.records["test"])
