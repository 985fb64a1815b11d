"""The ``datasets`` backend: same records, order, subsamples and located errors as the JSON one."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_cli_errors import MEND, command_line
from test_data_samples import (
    DATA,
    counterfact_raw,
    ft_config,
    needs_data,
    write_json,
    zsre_raw,
)
from test_ddp_fit import ROOT, _args, _learned, needs_gloo

from lit_edit.cli import evaluate_main, train_main
from lit_edit.data import EditDataModule
from lit_edit.data.arrow import ArrowRecords, open_table, read_records_arrow
from lit_edit.data.reading import read_records
from lit_edit.records import DataFileError


def zsre_file(tmp_path: Path, n: int = 30) -> tuple[Path, list[dict[str, Any]]]:
    """A ZsRE file of ``n`` distinct records, with an unused key and an empty optional value."""
    raws = [zsre_raw(src=f"Which country is Paris {i} in?", subject=f"Paris {i}",
                     alt=f"Italy{i}") for i in range(n)]
    raws[0]["extra_key"] = 3
    raws[min(5, n - 1)]["loc_ans"] = ""  # dropped with a note
    return write_json(tmp_path / "zsre.json", raws), raws


def same_report(a: Any, b: Any) -> None:
    assert [str(e) for e in a.skipped] == [str(e) for e in b.skipped]
    assert (a.notes, a.unused_keys, a.unused_nested_keys, a.num_read, a.format_name) == (
        b.notes, b.unused_keys, b.unused_nested_keys, b.num_read, b.format_name)


def test_records_and_report_equal_the_json_backend(tmp_path: Path) -> None:
    path, _ = zsre_file(tmp_path)
    expected = read_records(path)
    got = read_records_arrow(str(path), cache_dir=str(tmp_path / "cache"))
    assert isinstance(got.records, ArrowRecords)
    assert list(got.records) == expected.records
    assert got.records[7] == expected.records[7] and got.records[-1] == expected.records[-1]
    assert list(got.records[2:9:3]) == expected.records[2:9:3]
    assert got.records.__getitems__([4, 0, 4]) == [expected.records[i] for i in (4, 0, 4)]
    assert expected.notes and expected.unused_keys["extra_key"] == 1
    same_report(got, expected)


def test_a_bad_record_gives_the_same_located_error(tmp_path: Path) -> None:
    raws = [zsre_raw(), zsre_raw(alt=""), zsre_raw(answers=3), "not an object", zsre_raw()]
    path = write_json(tmp_path / "bad.json", raws)
    with pytest.raises(DataFileError) as json_error:
        read_records(path)
    with pytest.raises(DataFileError) as arrow_error:
        read_records_arrow(str(path), cache_dir=str(tmp_path / "cache"))
    assert str(arrow_error.value) == str(json_error.value)
    assert str(arrow_error.value) == f"{path}: record 1, field 'alt': is empty"
    assert (arrow_error.value.index, arrow_error.value.field) == (1, "alt")
    expected = read_records(path, skip_invalid=True)
    got = read_records_arrow(str(path), skip_invalid=True, cache_dir=str(tmp_path / "cache"))
    assert got.skipped_indices == [1, 2, 3] == expected.skipped_indices
    assert list(got.records) == expected.records and [r.index for r in got.records] == [0, 4]
    same_report(got, expected)


def test_file_level_errors_are_the_json_backends(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"src": "a",\n  "alt": }]')
    cache = str(tmp_path / "cache")
    for path in (broken, tmp_path / "absent.json", write_json(tmp_path / "empty.json", [])):
        with pytest.raises(DataFileError) as json_error:
            read_records(path)
        with pytest.raises(DataFileError) as arrow_error:
            read_records_arrow(str(path), cache_dir=cache)
        assert str(arrow_error.value) == str(json_error.value)
    good = write_json(tmp_path / "zsre.json", [zsre_raw()])
    with pytest.raises(DataFileError) as json_error:
        read_records(good, "nope")
    with pytest.raises(DataFileError, match="unknown data format 'nope'") as arrow_error:
        read_records_arrow(str(good), "nope", cache_dir=cache)
    assert str(arrow_error.value) == str(json_error.value)


def test_jsonl_and_parquet_files(tmp_path: Path) -> None:
    import datasets

    path, raws = zsre_file(tmp_path)
    expected = read_records(path).records
    jsonl = tmp_path / "zsre.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in raws[:10]) + "\n\n" +
                     "\n".join(json.dumps(r) for r in raws[10:]) + "\n")
    cache = str(tmp_path / "cache")
    got = read_records_arrow(str(jsonl), cache_dir=cache)
    assert list(got.records) == read_records(jsonl).records
    assert [(r.prompt, r.index) for r in got.records] == [(r.prompt, r.index) for r in expected]
    parquet = tmp_path / "zsre.parquet"
    datasets.Dataset.from_list(raws).to_parquet(str(parquet))
    got = read_records_arrow(str(parquet), cache_dir=cache)
    # a typed table has every column in every row: the absent `extra_key` is null, left out
    assert [r.to_dict() | {"source": ""} for r in got.records] == [
        r.to_dict() | {"source": ""} for r in expected]
    assert got.unused_keys == {"pred": 30, "cond": 30, "extra_key": 1}


def test_the_table_is_cached_and_rebuilt_when_the_file_changes(tmp_path: Path) -> None:
    path, raws = zsre_file(tmp_path, 6)
    cache = str(tmp_path / "cache")
    first, json_rows = open_table(str(path), cache)
    again, _ = open_table(str(path), cache)
    assert json_rows and first.cache_files == again.cache_files
    assert first.cache_files and first.cache_files[0]["filename"].startswith(cache)
    write_json(path, raws[:2])
    os.utime(path, ns=(1, 1))
    changed, _ = open_table(str(path), cache)
    assert len(changed) == 2 and changed.cache_files != first.cache_files


def test_records_pickle_by_reference_for_loader_workers(tmp_path: Path) -> None:
    path, _ = zsre_file(tmp_path)
    records = read_records_arrow(str(path), cache_dir=str(tmp_path / "cache")).records
    blob = pickle.dumps(records)
    assert len(blob) < 4000  # the table is the cache file's name, not its rows
    assert list(pickle.loads(blob)) == list(records)


def test_hub_name_while_offline_is_one_located_error(tmp_path: Path) -> None:
    with pytest.raises(DataFileError) as info:
        read_records_arrow("hf://nobody/nothing-here:train", cache_dir=str(tmp_path))
    assert str(info.value).startswith("hf://nobody/nothing-here:train: cannot load with")
    assert "\n" not in str(info.value)
    with pytest.raises(DataFileError, match="expected hf://ORG/NAME:SPLIT"):
        read_records_arrow("hf://nobody/nothing-here", cache_dir=str(tmp_path))


def module(backend: str, tmp_path: Path, **kwargs: Any) -> EditDataModule:
    dm = EditDataModule(backend=backend, datasets_cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.prepare_data()
    return dm


def test_data_module_splits_subsamples_and_batches_are_equal(tmp_path: Path) -> None:
    path, _ = zsre_file(tmp_path, 60)
    args = dict(path=str(path), val_fraction=0.2, test_fraction=0.1, split_seed=3,
                max_train_records=25, max_val_records=5, batch_size=4)
    by_json, by_arrow = module("json", tmp_path, **args), module("datasets", tmp_path, **args)
    for stage in ("fit", "test"):
        by_json.setup(stage)
        by_arrow.setup(stage)
    assert isinstance(by_arrow.records["train"], ArrowRecords)
    assert len(by_arrow.records["train"]) == 25 and len(by_arrow.records["test"]) == 6
    for split in ("train", "val", "test"):
        assert list(by_arrow.records[split]) == by_json.records[split]
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        assert list(getattr(by_arrow, name)()) == list(getattr(by_json, name)())
    same_report(by_arrow.read_results["path"], by_json.read_results["path"])


def test_per_split_files_with_first_subsample_and_skip_invalid(tmp_path: Path) -> None:
    train = write_json(tmp_path / "train.json",
                       [counterfact_raw(case_id=i, prompt=f"The tongue of Ann {i} is",
                                        subject=f"Ann {i}") for i in range(12)]
                       + [counterfact_raw(target_new=5)])
    args = dict(train_path=str(train), val_path=str(train), skip_invalid=True,
                max_val_records=4, subsample="first")
    by_json, by_arrow = module("json", tmp_path, **args), module("datasets", tmp_path, **args)
    by_json.setup("fit")
    by_arrow.setup("fit")
    assert by_arrow.read_results["train"].skipped_indices == [12]
    for split in ("train", "val"):
        assert list(by_arrow.records[split]) == by_json.records[split]
    assert [r.meta["case_id"] for r in by_arrow.records["val"]] == [0, 1, 2, 3]


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="backend must be 'json' or 'datasets', got 'arrow'"):
        EditDataModule(backend="arrow")  # type: ignore[arg-type]


@needs_data
@pytest.mark.parametrize("name", ["zsre/zsre_mend_eval_portability_gpt4.json",
                                  "zsre/zsre_mend_train-1k.json",
                                  "counterfact/counterfact-val.json"])
def test_shared_data_files_read_the_same(tmp_path: Path, name: str) -> None:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    expected = read_records(path, skip_invalid=True)
    got = read_records_arrow(str(path), skip_invalid=True, cache_dir=str(tmp_path))
    assert list(got.records) == expected.records
    same_report(got, expected)


def test_train_fit_with_the_datasets_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    path, _ = zsre_file(tmp_path, 8)
    overlay = tmp_path / "data.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"fast_dev_run": 2, "logger": False, "enable_progress_bar": False,
                    "callbacks": []},
        "data": {
            "class_path": "lit_edit.data.EditDataModule",
            "init_args": {"train_path": str(path), "val_path": str(path), "format": "zsre",
                          "backend": "datasets", "datasets_cache_dir": str(tmp_path / "c")},
        },
    }))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["train.py", "fit", "--config", MEND, "--config",
                                     str(overlay)])
    train_main()
    assert list((tmp_path / "c").rglob("*.arrow"))
    bad = write_json(tmp_path / "bad.json", [zsre_raw(), zsre_raw(alt="")])
    overlay.write_text(overlay.read_text().replace(str(path), str(bad)))
    message = command_line(monkeypatch, train_main, "fit", "--config", MEND, "--config",
                           str(overlay))
    assert f"error: {bad}: record 1, field 'alt': is empty" in message


@pytest.mark.slow
@needs_gloo
def test_ddp_fit_with_the_datasets_backend_equals_one_json_process(tmp_path: Path) -> None:
    """2 processes (gloo) reading one cache equal one JSON-backend process accumulating 2."""
    torch.set_num_threads(1)
    path, _ = zsre_file(tmp_path, 16)

    def overlay(backend: str) -> list[str]:
        data = tmp_path / f"{backend}.yaml"
        data.write_text(yaml.safe_dump({"data": {
            "class_path": "lit_edit.data.EditDataModule",
            "init_args": {"train_path": str(path), "val_path": str(path), "format": "zsre",
                          "backend": backend, "datasets_cache_dir": str(tmp_path / "cache")},
        }}))
        return ["--config", str(data), "--model.init_args.max_length", "64"]

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train_main([*_args(single), *overlay("json"), "--trainer.accumulate_grad_batches", "2"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    process = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *_args(ddp), *overlay("datasets"),
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:]
    arrow = sorted(p.name for p in (tmp_path / "cache").rglob("*.arrow"))
    assert len(arrow) == 2, arrow  # one table, opened by both; its max_length check by rank 0
    assert len([name for name in arrow if name.startswith("cache-")]) == 1, arrow
    one, two = _learned(single / "final.ckpt"), _learned(ddp / "final.ckpt")
    assert one.keys() == two.keys() and one
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)


def test_evaluate_with_the_datasets_backend_writes_the_json_backends_results(
    tmp_path: Path,
) -> None:
    path, _ = zsre_file(tmp_path, 4)
    results = {}
    for backend in ("json", "datasets"):
        folder = tmp_path / backend
        folder.mkdir()
        config = ft_config(folder, path)
        data = yaml.safe_load(config.read_text())
        data["data"]["init_args"].update(backend=backend,
                                         datasets_cache_dir=str(tmp_path / "cache"))
        config.write_text(yaml.safe_dump(data))
        evaluate_main(["--config", str(config)])
        results[backend] = [json.loads(line) for line in
                            (folder / "results" / "records.jsonl").read_text().splitlines()]
    assert len(results["json"]) == 4
    assert results["datasets"] == results["json"]


def test_the_validation_is_kept_for_later_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    from lit_edit.data.base import RecordReader

    raws = [zsre_raw(), zsre_raw(alt=""), zsre_raw(loc_ans="", extra=1), zsre_raw()]
    path = write_json(tmp_path / "bad.json", raws)
    cache = str(tmp_path / "cache")
    first = read_records_arrow(str(path), skip_invalid=True, cache_dir=cache)
    expected = read_records(path, skip_invalid=True).records
    assert len(list((tmp_path / "cache").rglob("lit_edit-validation-*.json"))) == 1

    def no_validation(*args: Any) -> Any:
        raise AssertionError("validated again")

    monkeypatch.setattr(RecordReader, "parse_items", no_validation)
    monkeypatch.chdir(tmp_path)
    again = read_records_arrow("bad.json", skip_invalid=True, cache_dir=cache)
    assert [r.to_dict() | {"source": ""} for r in again.records] == [
        r.to_dict() | {"source": ""} for r in expected]
    assert {r.source for r in again.records} == {"bad.json"}
    assert [str(e) for e in again.skipped] == ["bad.json: record 1, field 'alt': is empty"]
    assert (again.notes, again.unused_keys, again.num_read) == (
        first.notes, first.unused_keys, first.num_read)
    with pytest.raises(AssertionError, match="validated again"):  # other options: validated
        read_records_arrow("bad.json", skip_invalid=False, cache_dir=cache)


def _long_answer_file(tmp_path: Path) -> Path:
    """A ZsRE file whose record 2 has a locality answer longer than ``max_length`` 12."""
    good = [zsre_raw(src=f"Which country is Paris {i} in?", subject=f"Paris {i}")
            for i in range(6)]
    good[2]["loc_ans"] = " ".join(["Rome"] * 30)
    return write_json(tmp_path / "long.json", good)


def _checked(tmp_path: Path, backend: str, path: Path, **model: Any) -> EditDataModule:
    """``EditorModule.setup('fit')`` of a MEND editor on ``path`` (train and val splits)."""
    return _checked_editor(tmp_path, backend, path, **model)[0]


def _checked_editor(tmp_path: Path, backend: str, path: Path, **model: Any) -> tuple[Any, Any]:
    """:func:`_checked`, and the editor."""
    from types import SimpleNamespace

    from lit_edit.methods import MENDEditor

    dm = module(backend, tmp_path, train_path=str(path), val_path=str(path), format="zsre")
    dm.setup("fit")
    editor = MENDEditor(backbone="tinyfacts", **{"max_length": 12, **model})
    trainer = SimpleNamespace(datamodule=dm, world_size=1, testing=False, predicting=False)
    editor._trainer = trainer  # type: ignore[assignment]
    editor.setup("fit")
    return dm, editor


def test_max_length_check_is_tokenized_once_and_cached(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import lit_edit.data.arrow_tokens as arrow_tokens

    torch.set_num_threads(1)
    path = _long_answer_file(tmp_path)
    by_json = _checked(tmp_path, "json", path, long_records="skip")
    calls: list[int] = []
    fits, getitem = arrow_tokens.check_collatable, ArrowRecords.__getitem__
    monkeypatch.setattr(arrow_tokens, "check_collatable", lambda *a: calls.append(1) or fits(*a))
    monkeypatch.setattr(ArrowRecords, "__getitem__",
                        lambda *a: pytest.fail("the split was materialised"))
    first = _checked(tmp_path, "datasets", path, long_records="skip")
    assert len(calls) == 6  # each record tokenized once: the val split (same rows) reuses it
    cached = list((tmp_path / "cache").rglob("cache-*.arrow"))
    assert len(cached) == 1  # the flags of the rows, next to the table
    monkeypatch.setattr(ArrowRecords, "__getitem__", getitem)
    for split in ("train", "val"):
        assert isinstance(first.records[split], ArrowRecords)
        assert list(first.records[split]) == by_json.records[split]
        assert [r.index for r in first.records[split]] == [0, 1, 3, 4, 5]

    calls.clear()  # a second run opens the cache: nothing is tokenized
    again = _checked(tmp_path, "datasets", path, long_records="skip")
    assert calls == [] and list(again.records["train"]) == by_json.records["train"]
    assert sorted((tmp_path / "cache").rglob("cache-*.arrow")) == sorted(cached)

    _checked(tmp_path, "datasets", path, long_records="skip", max_length=64)  # other settings
    assert len(calls) == 6 and len(list((tmp_path / "cache").rglob("cache-*.arrow"))) == 2


def test_training_batches_read_the_cached_token_ids(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import lit_edit.data.collate as collate

    torch.set_num_threads(1)
    path = _long_answer_file(tmp_path)
    dm_json, by_json = _checked_editor(tmp_path, "json", path, long_records="skip")
    dm, editor = _checked_editor(tmp_path, "datasets", path, long_records="skip")
    assert len(editor.token_caches) == 2  # train and val
    batches = [list(dm.records["train"])[i : i + 2] for i in (0, 2, 4)]  # the last one: 1 record
    expected = [by_json.on_before_batch_transfer(b, 0) for b in batches]
    assert by_json.collator.pairs.known == {}  # the JSON backend tokenizes as before
    counted: list[int] = []
    encode = collate.encode_pair
    monkeypatch.setattr(collate, "encode_pair", lambda *a: counted.append(1) or encode(*a))
    for batch, want in zip(batches, expected, strict=True):
        got = editor.on_before_batch_transfer(batch, 0)
        assert editor.collator.pairs.known  # the batch's pairs, from the cache file
        assert got.keys() == want.keys()
        for part, value in want.items():
            if not isinstance(value, dict):  # e.g. the records themselves
                assert got[part] == value, part
                continue
            for name, tensor in value.items():
                assert torch.equal(got[part][name], tensor), (part, name)
    assert counted == []  # nothing tokenized: every pair's ids were read
    # a record of another file is tokenized as usual
    other = dm_json.records["train"][0]
    moved = dataclasses.replace(other, source="elsewhere.json")
    editor.on_before_batch_transfer([moved], 0)
    assert counted and editor.collator.pairs.known == {}

    # without max_length the datasets backend still tokenizes once and caches the ids
    _, unlimited = _checked_editor(tmp_path, "datasets", path, max_length=None)
    assert len(unlimited.token_caches) == 2 and bool(unlimited.token_caches[0].fits.all())


def test_max_length_error_from_the_cache_is_the_json_backends(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    path = _long_answer_file(tmp_path)
    errors = []
    for backend in ("json", "datasets", "datasets"):  # the second datasets run: from the cache
        with pytest.raises(DataFileError) as raised:
            _checked(tmp_path, backend, path)
        errors.append(str(raised.value))
    assert errors[0] == errors[1] == errors[2]
    assert errors[0].startswith(f"{path}: record 2: train split: max_length=12 leaves no room")
