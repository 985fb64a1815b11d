"""The check command ``python -m lit_edit.data``, run in-process through ``main(argv)``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_samples import DATA, conversation_raw, needs_data, write_json, zsre_raw

from lit_edit.data.check import main
from lit_edit.data.reading import read_records


def first_record_json(out: str) -> dict:
    block = out.split("  first record:\n", 1)[1]
    lines = []
    for line in block.splitlines():
        lines.append(line[2:])
        if line == "  }":
            break
    return json.loads("\n".join(lines))


def test_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_json(tmp_path / "z.json", [zsre_raw(), zsre_raw(alt="B")])
    assert main([str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"{path}: zsre, 2 records"
    assert first_record_json(out) == read_records(path).records[0].to_dict()
    assert err == ""


def test_malformed_file_fails_and_prints_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_json(tmp_path / "z.json", [zsre_raw(), zsre_raw(alt="")])
    assert main([str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"error: {path}: record 1, field 'alt': is empty" in err


def test_skip_invalid_lists_the_skipped_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_json(tmp_path / "z.json", [zsre_raw(), zsre_raw(alt=""), 3, zsre_raw()])
    assert main(["--skip-invalid", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: zsre, 2 records\n  skipped 2 invalid records: indices [1, 2]\n" in out
    assert "    record 1, field 'alt': is empty" in out
    assert "    record 2: expected a JSON object, got a number" in out


def test_notes_are_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_json(tmp_path / "z.json", [zsre_raw(loc_ans="")])
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "  dropped 1 empty optional values:\n    record 0, field 'loc_ans'" in out


def test_all_records_invalid_with_skip_is_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_json(tmp_path / "z.json", [zsre_raw(alt="")])
    assert main(["--skip-invalid", str(path)]) == 1
    assert "no valid record" in capsys.readouterr().err


def test_several_files_one_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_json(tmp_path / "good.json", [zsre_raw()])
    bad = tmp_path / "bad.json"
    bad.write_text("[{", encoding="utf-8")
    conv = write_json(tmp_path / "lte.json", [conversation_raw()])
    assert main([str(good), str(bad), str(conv)]) == 1
    out, err = capsys.readouterr()
    assert f"{good}: zsre, 1 records" in out and f"{conv}: lte, 1 records" in out
    assert f"error: {bad}: line 1, column 3: not valid JSON" in err


def test_forced_format_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_json(tmp_path / "z.json", [zsre_raw()])
    assert main(["--format", "counterfact", str(path)]) == 1
    assert "record 0, field 'prompt': is missing" in capsys.readouterr().err
    assert main(["--format", "nope", str(path)]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert "counterfact_rome" in help_text and "--skip-invalid" in help_text


@needs_data
def test_shared_zsre_train(capsys: pytest.CaptureFixture[str]) -> None:
    path = DATA / "zsre/zsre_mend_train-1k.json"
    assert main([str(path)]) == 1
    assert "record 534, field 'alt'" in capsys.readouterr().err
    assert main(["--skip-invalid", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: zsre, 998 records\n  skipped 2 invalid records: indices [534, 723]" in out
    assert first_record_json(out)["prompt"] == "What is the product made by UniFirst?"


@needs_data
def test_shared_files_all_valid(capsys: pytest.CaptureFixture[str]) -> None:
    paths = sorted(str(p) for p in DATA.rglob("*.json") if p.name != "zsre_mend_train-1k.json")
    assert main(paths) == 0
    out = capsys.readouterr().out
    assert f"{DATA / 'counterfact/counterfact-edit.json'}: counterfact, 10000 records" in out
    assert f"{DATA / 'wise/hallucination/hallucination-train.json'}: wise, 306 records" in out


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("broken.json", '[\n  {"src": "a",\n   "alt": }\n]\n', "line 3, column 11: not valid JSON"),
        (
            "lines.json",
            json.dumps(zsre_raw()) + "\n{oops\n",
            "line 2, column 2: not valid JSON (Expecting property name enclosed in double quotes)"
            " (read as JSON Lines: the file holds several values)",
        ),
        ("top.json", '{"data": []}', "expected a JSON list of records at the top level"),
        ("keys.json", '[{"question": "q", "answer": "a"}]', "record 0: cannot detect the data"),
        ("field.json", json.dumps([{**zsre_raw(), "answers": 3}]), "record 0, field 'answers'"),
        ("notes.txt", "[]", "unsupported extension '.txt'"),
        ("folder.json", None, "is a directory, not a data file"),
        ("absent.json", "", "no such file"),
    ],
)
def test_every_data_mistake_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str | None,
    expected: str,
) -> None:
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif name != "absent.json":
        path.write_text(content, encoding="utf-8")
    assert main([str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: "), err
    assert expected in err


def test_traceback_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lit_edit.records import DataFileError

    path = write_json(tmp_path / "z.json", [zsre_raw(alt="")])
    monkeypatch.setenv("LIT_EDIT_TRACEBACK", "1")
    with pytest.raises(DataFileError, match="record 0, field 'alt': is empty"):
        main([str(path)])
