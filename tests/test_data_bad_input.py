"""Bad input: every error names the file, the record index and the source field."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from test_data_samples import (
    conversation_raw,
    counterfact_raw,
    knowedit_raw,
    rome_raw,
    wise_raw,
    write_json,
    zsre_raw,
)

from lit_edit.data import read_conversations, read_records
from lit_edit.records import DataFileError


def expect_error(
    path: Path, index: int | None, field: str | None, match: str, **kwargs: Any
) -> DataFileError:
    with pytest.raises(DataFileError) as info:
        read_records(path, **kwargs)
    err = info.value
    assert err.path == str(path)
    assert (err.index, err.field) == (index, field)
    text = str(err)
    assert path.name in text and match in text
    if index is not None:
        assert f"record {index}" in text
    if field is not None:
        assert f"field '{field}'" in text
    return err


# --- file-level errors ----------------------------------------------------------------------


def test_not_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"src": "a",\n   "alt": }\n]\n', encoding="utf-8")
    err = expect_error(path, None, None, "line 3, column 11: not valid JSON")
    assert "Expecting value" in str(err)


def test_not_json_in_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(zsre_raw()) + "\n{oops\n", encoding="utf-8")
    expect_error(path, None, None, "line 2, column 2: not valid JSON")


def test_not_json_is_fatal_even_when_skipping(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(zsre_raw()) + "\nnot json\n", encoding="utf-8")
    expect_error(path, None, None, "line 2", skip_invalid=True)


@pytest.mark.parametrize(
    ("data", "kind"), [({"data": []}, "an object"), ("text", "a string"), (3, "a number")]
)
def test_wrong_top_level_type(tmp_path: Path, data: Any, kind: str) -> None:
    path = write_json(tmp_path / "top.json", data)
    expect_error(path, None, None, f"expected a JSON list of records at the top level, got {kind}")


def test_empty_file_missing_file_and_extension(tmp_path: Path) -> None:
    expect_error(write_json(tmp_path / "empty.json", []), None, None, "contains no records")
    expect_error(tmp_path / "absent.json", None, None, "no such file")
    path = tmp_path / "data.csv"
    path.write_text("a,b\n", encoding="utf-8")
    expect_error(path, None, None, "unsupported extension '.csv'")


def test_undetectable_format_lists_the_keys(tmp_path: Path) -> None:
    path = write_json(tmp_path / "odd.json", [{"question": "q", "answer": "a"}])
    expect_error(path, 0, None, "cannot detect the data format from the first record's keys")
    with pytest.raises(DataFileError, match=r"answer, question"):
        read_records(path)


def test_unknown_forced_format(tmp_path: Path) -> None:
    path = write_json(tmp_path / "z.json", [zsre_raw()])
    expect_error(path, None, None, "unknown data format 'zsre2'", format="zsre2")


def test_forced_format_that_does_not_fit(tmp_path: Path) -> None:
    path = write_json(tmp_path / "z.json", [zsre_raw()])
    expect_error(path, 0, "prompt", "is missing", format="counterfact")


# --- record-level errors --------------------------------------------------------------------


def test_record_that_is_not_an_object(tmp_path: Path) -> None:
    path = write_json(tmp_path / "z.json", [zsre_raw(), ["not", "an", "object"]])
    expect_error(path, 1, None, "expected a JSON object, got a list")


def test_no_record_is_an_object(tmp_path: Path) -> None:
    path = write_json(tmp_path / "z.json", [1, 2])
    expect_error(path, 0, None, "no record is a JSON object")


@pytest.mark.parametrize("field", ["src", "alt", "rephrase", "subject", "answers", "loc_ans"])
def test_zsre_missing_required_field(tmp_path: Path, field: str) -> None:
    raw = zsre_raw()
    del raw[field]
    path = write_json(tmp_path / "z.json", [zsre_raw(), raw])
    expect_error(path, 1, field, "is missing")


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: zsre_raw(alt=""), "alt"),
        (lambda: zsre_raw(alt="   "), "alt"),
        (lambda: counterfact_raw(target_new=""), "target_new"),
        (lambda: knowedit_raw(target_new=""), "target_new"),
        (lambda: wise_raw(target_new=""), "target_new"),
        (
            lambda: rome_raw(
                requested_rewrite={**rome_raw()["requested_rewrite"], "target_new": {"str": ""}}
            ),
            "requested_rewrite.target_new.str",
        ),
    ],
    ids=["zsre", "zsre-blank", "counterfact", "knowedit", "wise", "rome"],
)
def test_empty_target(tmp_path: Path, make: Any, field: str) -> None:
    path = write_json(tmp_path / "t.json", [make()])
    expect_error(path, 0, field, "is empty")


@pytest.mark.parametrize(
    ("raw", "field", "prompt_field"),
    [
        (zsre_raw(subject="Rome"), "subject", "src"),
        (counterfact_raw(subject="Zed"), "subject", "prompt"),
        (knowedit_raw(subject="Zed"), "subject", "prompt"),
        (wise_raw(subject="Zed"), "subject", "prompt"),
    ],
    ids=["zsre", "counterfact", "knowedit", "wise"],
)
def test_subject_absent_from_prompt(
    tmp_path: Path, raw: Any, field: str, prompt_field: str
) -> None:
    path = write_json(tmp_path / "s.json", [raw])
    expect_error(path, 0, field, f"does not occur in {prompt_field}")


def test_rome_prompt_without_subject_slot(tmp_path: Path) -> None:
    rewrite = {**rome_raw()["requested_rewrite"], "prompt": "Camembert originates from"}
    path = write_json(tmp_path / "r.json", [rome_raw(requested_rewrite=rewrite)])
    expect_error(path, 0, "requested_rewrite.prompt", "exactly one '{}' subject slot")


@pytest.mark.parametrize(
    ("raw", "field", "match"),
    [
        (zsre_raw(alt=5), "alt", "expected a string, got number"),
        (zsre_raw(src=None), "src", "expected a string, got null"),
        (zsre_raw(answers={"a": 1}), "answers", "expected a string, a list of strings"),
        (zsre_raw(answers=[1]), "answers", "expected a string, a list of strings"),
        (zsre_raw(portability="yes"), "portability", "expected an object, got string"),
        (zsre_raw(portability={"New Question": "Q?"}), "portability.New Answer", "is missing"),
        (counterfact_raw(locality_ground_truth=["French"]), "locality_ground_truth", "got list"),
        (rome_raw(neighborhood_prompts="Brie"), "neighborhood_prompts", "expected a list"),
        (rome_raw(paraphrase_prompts=["ok", 3]), "paraphrase_prompts[1]", "got number"),
        (rome_raw(requested_rewrite="x"), "requested_rewrite", "expected an object, got string"),
        (knowedit_raw(portability={"Reasoning": "x"}), "portability.Reasoning", "list of objects"),
        (knowedit_raw(locality=[1]), "locality", "expected an object, got list"),
        (
            knowedit_raw(portability={"Reasoning": [{"prompt": "p", "ground_truth": 5}]}),
            "portability.Reasoning[0].ground_truth",
            "expected a string, a list of strings",
        ),
        (
            knowedit_raw(locality={"Forgetfulness": [{"ground_truth": "x"}]}),
            "locality.Forgetfulness[0].prompt",
            "is missing",
        ),
        (knowedit_raw(locality={"Forgetfulness": ["x"]}), "locality.Forgetfulness[0]", "object"),
        (wise_raw(rephrase_prompt=["a"]), "rephrase_prompt", "expected a string, got list"),
    ],
)
def test_wrong_field_types(tmp_path: Path, raw: Any, field: str, match: str) -> None:
    path = write_json(tmp_path / "w.json", [raw])
    expect_error(path, 0, field, match)


# --- skip_invalid ---------------------------------------------------------------------------


def test_skip_invalid_counts_and_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raws = [zsre_raw(), zsre_raw(alt=""), 7, zsre_raw(subject="Nowhere"), zsre_raw(src=3)]
    raws += [zsre_raw(alt="B")]
    path = write_json(tmp_path / "z.json", raws)
    with caplog.at_level(logging.WARNING, logger="lit_edit.data.reading"):
        result = read_records(path, skip_invalid=True)
    assert [r.index for r in result.records] == [0, 5]
    assert result.skipped_indices == [1, 2, 3, 4]
    assert [e.field for e in result.skipped] == ["alt", None, "subject", "src"]
    assert all(e.path == str(path) for e in result.skipped)
    assert len(result.records) + len(result.skipped) == len(raws)
    assert "skipped 4 invalid records: indices [1, 2, 3, 4]" in caplog.text
    assert "record 1, field 'alt': is empty" in caplog.text


def test_notes_of_skipped_records_are_not_reported(tmp_path: Path) -> None:
    raws = [zsre_raw(loc_ans=""), zsre_raw(loc_ans="", alt="")]
    result = read_records(write_json(tmp_path / "z.json", raws), skip_invalid=True)
    assert [(n.index, n.field) for n in result.notes] == [(0, "loc_ans")]
    assert result.records[0].locality == {} and "loc_prompt" not in result.records[0].meta


def test_empty_optional_values_are_noted_not_errors(tmp_path: Path) -> None:
    raws = [
        knowedit_raw(
            ground_truth="",
            rephrase_prompt=" ",
            portability={"Reasoning": [{"prompt": "", "ground_truth": "x"}]},
            locality={"Forgetfulness": [{"prompt": "p", "ground_truth": [[""]]}]},
        )
    ]
    result = read_records(write_json(tmp_path / "k.json", raws))
    record = result.records[0]
    assert (record.ground_truth, record.rephrase_prompts) == ((), ())
    assert (record.portability, record.locality) == ({}, {})
    assert sorted(n.field for n in result.notes) == [
        "ground_truth",
        "locality.Forgetfulness[0].ground_truth",
        "portability.Reasoning[0].prompt",
        "rephrase_prompt",
    ]


# --- LTE conversations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conversations", "field", "match"),
    [
        ([{"from": "gpt", "value": "a"}], "conversations[0].from", "expected 'human'"),
        (
            [{"from": "human", "value": "q"}, {"from": "user", "value": "a"}],
            "conversations[1].from",
            "got 'user'",
        ),
        (
            [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}],
            "conversations[1].value",
            "is empty",
        ),
        ([{"from": "human", "value": 3}], "conversations[0].value", "expected a string"),
        ([{"from": "human", "value": "q"}], "conversations[0]", "has no gpt answer"),
        (["q"], "conversations[0]", "expected an object"),
        ([], "conversations", "is empty"),
        ("q", "conversations", "expected a list of turns"),
    ],
)
def test_bad_conversations(tmp_path: Path, conversations: Any, field: str, match: str) -> None:
    path = write_json(
        tmp_path / "lte.json", [conversation_raw(), conversation_raw(conversations=conversations)]
    )
    with pytest.raises(DataFileError) as info:
        read_conversations(path)
    assert (info.value.index, info.value.field) == (1, field)
    assert match in str(info.value) and "lte.json" in str(info.value)
    result = read_conversations(path, skip_invalid=True)
    assert (result.num_read, result.skipped_indices) == (1, [1])


def test_conversation_id_of_wrong_type(tmp_path: Path) -> None:
    path = write_json(tmp_path / "lte.json", [conversation_raw(id=["x"])])
    with pytest.raises(DataFileError, match="field 'id'"):
        read_conversations(path)


def test_edit_file_is_refused_by_read_conversations(tmp_path: Path) -> None:
    path = write_json(tmp_path / "z.json", [zsre_raw()])
    with pytest.raises(DataFileError, match="'zsre' format"):
        read_conversations(path)
