"""Format variants: KnowEdit WikiBio, the portability variants, JSON Lines by content, no field
left unused without a report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_samples import (
    DATA,
    conversation_raw,
    counterfact_raw,
    ft_config,
    needs_data,
    rome_raw,
    wise_raw,
    write_json,
    zsre_raw,
)

from lit_edit.data import WikiBioReader, read_conversations, read_records
from lit_edit.data.check import main
from lit_edit.records import DataFileError, EditRecord, QAPair, RecordError


def wikibio_raw() -> dict[str, object]:
    return {
        "text": "Ann Lee (born 1901) is a painter from Oslo.",
        "labels": "She studied in Paris and exhibited in Rome.",
        "concept": "Ann Lee",
        "locality": {
            "Relation_Specificity": [
                {"prompt": "Ann Lee was born in", "ground_truth": ["Oslo", "Christiania"]}
            ],
            "Forgetfulness": {"prompt": "Ann Lee painted", "ground_truth": "landscapes"},
        },
    }


# --- KnowEdit WikiBio -----------------------------------------------------------------------


def test_wikibio_is_detected_and_read(tmp_path: Path) -> None:
    result = read_records(write_json(tmp_path / "wikibio.json", [wikibio_raw()]))
    assert result.format_name == "wikibio"
    (record,) = result.records
    assert record.prompt == "Ann Lee (born 1901) is a painter from Oslo."
    assert record.target_new == "She studied in Paris and exhibited in Rome."
    assert record.ground_truth == ()
    assert record.subject == "Ann Lee"
    assert record.rephrase_prompts == ()
    assert record.locality == {
        "Relation_Specificity": (QAPair("Ann Lee was born in", "Oslo", ("Christiania",)),),
        "Forgetfulness": (QAPair("Ann Lee painted", "landscapes"),),
    }
    assert record.portability == {}
    assert record.meta == {}
    assert result.unused_keys == {} and result.notes == []


def test_wikibio_concept_absent_from_text_is_noted_not_an_error(tmp_path: Path) -> None:
    raw = {**wikibio_raw(), "concept": "Lee, Ann"}
    result = read_records(write_json(tmp_path / "wikibio.json", [raw]))
    (record,) = result.records
    assert record.subject is None and record.meta == {"concept": "Lee, Ann"}
    assert [(n.index, n.field) for n in result.notes] == [(0, "concept")]


def test_wikibio_missing_labels_names_the_field(tmp_path: Path) -> None:
    raw = wikibio_raw()
    raw["labels"] = ""
    with pytest.raises(DataFileError) as info:
        read_records(write_json(tmp_path / "wikibio.json", [wikibio_raw(), raw]))
    assert (info.value.index, info.value.field) == (1, "labels")


def test_wikibio_reader_parse() -> None:
    record = WikiBioReader().parse(wikibio_raw(), 4, "f.json")
    assert (record.index, record.source) == (4, "f.json")


# --- ZsRE / CounterFact portability variants ------------------------------------------------


def test_zsre_subject_replace_without_loc(tmp_path: Path) -> None:
    raw = zsre_raw(alternative_subject="City of Light")
    del raw["loc"], raw["loc_ans"]
    (record,) = read_records(write_json(tmp_path / "sr.json", [raw])).records
    assert record.locality == {}
    assert "loc_prompt" not in record.meta
    assert record.portability == {
        "subject_replace": (QAPair("Which country is City of Light in?", "Italy"),)
    }
    assert record.prompt == "Which country is Paris in?" and record.target_new == "Italy"


def test_zsre_inverse_relation_asks_for_the_subject(tmp_path: Path) -> None:
    raw = zsre_raw(**{"inverse question": "Which city is in Italy?"})
    del raw["loc"], raw["loc_ans"]
    (record,) = read_records(write_json(tmp_path / "inv.json", [raw])).records
    assert record.portability == {"inverse_relation": (QAPair("Which city is in Italy?", "Paris"),)}
    assert record.locality == {}


def test_zsre_loc_without_loc_ans_is_still_an_error(tmp_path: Path) -> None:
    raw = zsre_raw()
    del raw["loc_ans"]
    with pytest.raises(DataFileError) as info:
        read_records(write_json(tmp_path / "z.json", [raw]))
    assert (info.value.index, info.value.field) == (0, "loc_ans")


def test_zsre_alternative_subject_of_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(DataFileError) as info:
        read_records(write_json(tmp_path / "z.json", [zsre_raw(alternative_subject=3)]))
    assert (info.value.index, info.value.field) == (0, "alternative_subject")


def test_counterfact_flat_portability_and_subject_replace(tmp_path: Path) -> None:
    raw = counterfact_raw(
        alternative_subject="Annie",
        portability={
            "Recalled Relation": "(Ann, mother tongue, English)",
            "New Question": "Which country's language is Ann's mother tongue?",
            "New Answer": "England",
        },
    )
    (record,) = read_records(write_json(tmp_path / "cf.json", [raw])).records
    assert record.portability == {
        "one_hop": (QAPair("Which country's language is Ann's mother tongue?", "England"),),
        "subject_replace": (QAPair("The mother tongue of Annie is", "English"),),
    }
    assert record.meta == {"case_id": 7, "recalled_relation": "(Ann, mother tongue, English)"}


@pytest.mark.parametrize(
    "extra",
    [
        {"portability": {"New Question": "Which country speaks Ann's tongue?", "New Answer": "UK"}},
        {"alternative_subject": "Annie"},
    ],
)
def test_counterfact_flat_variant_without_locality(tmp_path: Path, extra: dict) -> None:
    raw = counterfact_raw(**extra)
    del raw["locality_prompt"], raw["locality_ground_truth"]
    result = read_records(write_json(tmp_path / "cf.json", [raw]))
    assert result.format_name == "counterfact"
    (record,) = result.records
    assert record.locality == {}
    assert record.portability == (
        {"one_hop": (QAPair("Which country speaks Ann's tongue?", "UK"),)}
        if "portability" in extra
        else {"subject_replace": (QAPair("The mother tongue of Annie is", "English"),)}
    )


def test_knowedit_record_is_not_taken_for_counterfact(tmp_path: Path) -> None:
    raw = {
        "case_id": 1, "subject": "Ann", "prompt": "Ann lives in", "target_new": "Rome",
        "ground_truth": "Oslo",
        "portability": {"Reasoning": [{"prompt": "p", "ground_truth": "g"}]},
    }
    result = read_records(write_json(tmp_path / "k.json", [raw]))
    assert result.format_name == "knowedit"
    assert result.records[0].portability == {"Reasoning": (QAPair("p", "g"),)}


def test_rome_variant_without_neighborhood_prompts(tmp_path: Path) -> None:
    raw = rome_raw(alternative_subject="Camembert de Normandie")
    del raw["neighborhood_prompts"]
    (record,) = read_records(write_json(tmp_path / "rome.json", [raw])).records
    assert record.locality == {}
    assert record.portability == {
        "subject_replace": (QAPair("Camembert de Normandie originates from", "Japan"),)
    }


def test_rome_portability_and_distracting_neighborhood(tmp_path: Path) -> None:
    raw = rome_raw(
        portability={"New Question": "Which continent is Camembert from?", "New Answer": "Asia"},
        distracting_neighborhood_prompts=["Camembert originates from Japan. Brie originates from"],
        alternative_subject="Camembert de Normandie",
    )
    result = read_records(write_json(tmp_path / "rome.json", [raw]))
    (record,) = result.records
    assert record.locality == {
        "neighborhood": (
            QAPair("Brie originates from", "France"),
            QAPair("Roquefort originates from", "France"),
        ),
        "distracting": (QAPair("Camembert originates from Japan. Brie originates from", "France"),),
    }
    assert record.portability == {
        "one_hop": (QAPair("Which continent is Camembert from?", "Asia"),),
        "subject_replace": (QAPair("Camembert de Normandie originates from", "Japan"),),
    }
    assert "distracting_neighborhood_prompts" not in record.meta
    assert result.unused_keys == {"attribute_prompts": 1}


def test_rome_dneighborhood_spelling(tmp_path: Path) -> None:
    raw = rome_raw(dneighborhood_prompts=["X. Brie originates from"])
    (record,) = read_records(write_json(tmp_path / "rome.json", [raw])).records
    assert record.locality["distracting"] == (QAPair("X. Brie originates from", "France"),)


def test_rome_distracting_of_wrong_type(tmp_path: Path) -> None:
    raw = rome_raw(distracting_neighborhood_prompts=[{"prompt": "a"}])
    with pytest.raises(DataFileError) as info:
        read_records(write_json(tmp_path / "rome.json", [raw]))
    assert (info.value.index, info.value.field) == (0, "distracting_neighborhood_prompts[0]")


def test_wise_temporal_ood_rephrase_is_a_generalization_prompt(tmp_path: Path) -> None:
    raw = wise_raw(ood_rephrase="In a passage on ann lee, what comes next?")
    result = read_records(write_json(tmp_path / "temporal.json", [raw]))
    (record,) = result.records
    assert result.format_name == "wise"
    assert record.rephrase_prompts == ("In a passage on ann lee, what comes next?",)
    assert record.rephrase_kinds == ("ood",)
    assert record.meta == {} and result.unused_keys == {}


def test_wise_rephrase_then_ood_rephrase(tmp_path: Path) -> None:
    raw = wise_raw(rephrase_prompt="About ann lee:", ood_rephrase="Ann lee, next:")
    (record,) = read_records(write_json(tmp_path / "w.json", [raw])).records
    assert record.rephrase_prompts == ("About ann lee:", "Ann lee, next:")
    assert record.rephrase_kinds == ("rephrase", "ood")
    assert EditRecord.from_dict(record.to_dict()) == record
    plain = wise_raw(rephrase_prompt="About ann lee:")
    (record,) = read_records(write_json(tmp_path / "p.json", [plain])).records
    assert record.rephrase_kinds == ()  # no ood rephrase: one unnamed group, as before


def test_rephrase_kinds_are_generalization_groups_of_the_breakdown() -> None:
    import torch

    from lit_edit.evaluation import Evaluation, RecordEvaluator
    from lit_edit.record_measure import RecordMeasure
    from lit_edit.scoring import PairScore

    def score(right: int, of: int) -> PairScore:
        answer = torch.arange(of)
        pred = torch.where(torch.arange(of) < right, answer, answer + 100)
        return PairScore(answer, pred, torch.zeros(of))

    # in-distribution rephrase 1 of 2 tokens right, the two ood rephrases 0/1 and 3/3
    rephrase = [score(1, 2), score(0, 1), score(3, 3)]
    m = RecordMeasure(score(1, 1), rephrase, {}, {}, rephrase_kinds=("rephrase", "ood", "ood"))
    values = RecordEvaluator(Evaluation()).values(m, m, is_pre=True)
    assert values["generalization/rephrase"] == 0.5
    assert values["generalization/ood"] == 0.5  # (0 + 1) / 2, pairs averaged within a group
    assert abs(values["generalization"] - (0.5 + 0 + 1) / 3) < 1e-12
    with pytest.raises(RecordError, match="2 kinds for 1 rephrase prompts"):
        EditRecord("p", "t", rephrase_prompts=("a",), rephrase_kinds=("x", "y"))


# --- JSON Lines by content ------------------------------------------------------------------


def test_json_lines_named_json(tmp_path: Path) -> None:
    path = tmp_path / "z.json"
    path.write_text("\n".join(json.dumps(zsre_raw(alt=f"A{i}")) for i in range(3)) + "\n")
    result = read_records(path)
    assert [(r.index, r.target_new) for r in result.records] == [(0, "A0"), (1, "A1"), (2, "A2")]


def test_json_lines_named_json_with_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "z.json"
    path.write_text(json.dumps(zsre_raw()) + "\n{oops\n")
    with pytest.raises(DataFileError, match="line 2, column 2: not valid JSON .*JSON Lines"):
        read_records(path)


def test_json_list_named_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "z.jsonl"
    path.write_text(json.dumps([zsre_raw(alt="A0"), zsre_raw(alt="A1")], indent=2))
    assert [r.target_new for r in read_records(path).records] == ["A0", "A1"]


def test_single_object_json_is_still_refused(tmp_path: Path) -> None:
    path = write_json(tmp_path / "z.json", zsre_raw())
    with pytest.raises(DataFileError, match="expected a JSON list of records"):
        read_records(path)


def test_a_directory_is_not_a_data_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="is a directory, not a data file"):
        read_records(tmp_path)


# --- unused keys ----------------------------------------------------------------------------


def test_unused_keys_are_counted_and_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_json(tmp_path / "z.json", [zsre_raw(), zsre_raw(extra=1)])
    result = read_records(path)
    assert result.unused_keys == {"pred": 2, "cond": 2, "extra": 1}
    assert result.records[1].meta["extra"] == 1
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "keys not used (kept verbatim in meta):" in out
    assert "    pred (2 records)" in out and "    extra (1 records)" in out


def test_no_unused_keys_no_listing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_json(tmp_path / "w.json", [wise_raw()])
    assert main([str(path)]) == 0
    assert "keys not used" not in capsys.readouterr().out


def test_unused_keys_inside_objects_are_listed_by_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rewrite = rome_raw()["requested_rewrite"]
    rewrite = {
        **rewrite, "relation": "origin", "target_new": {"str": "Japan", "id": "Q17", "lang": "en"}
    }
    rome = rome_raw(
        requested_rewrite=rewrite,
        portability={"New Question": "Which continent?", "New Answer": "Asia", "Hop": 1},
    )
    path = write_json(tmp_path / "rome.json", [rome, rome_raw()])
    result = read_records(path)
    assert result.unused_keys == {"attribute_prompts": 2}
    assert result.unused_nested_keys == {
        "requested_rewrite.relation": 1,
        "requested_rewrite.target_new.lang": 1,
        "portability.Hop": 1,
    }
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "  keys inside objects not used (not kept):" in out
    assert "    requested_rewrite.target_new.lang (1 records)" in out
    assert "    portability.Hop (1 records)" in out


@pytest.mark.parametrize("reader", ["knowedit", "wikibio"])
def test_unused_keys_of_group_items_are_listed(tmp_path: Path, reader: str) -> None:
    groups = {
        "locality": {
            "Forgetfulness": [
                {"prompt": "Ann painted", "ground_truth": "x", "subject": "Ann"},
                {"prompt": "Ann lived in", "ground_truth": "y", "subject": "Ann"},
            ]
        },
        "portability": {"Reasoning": {"prompt": "p", "ground_truth": "g", "hop": 2}},
    }
    if reader == "wikibio":
        raw = {**wikibio_raw(), **groups}
    else:
        raw = {"subject": "Ann", "prompt": "Ann lives in", "target_new": "Rome", **groups}
    result = read_records(write_json(tmp_path / "k.json", [raw, raw, {**raw, **{"locality": {}}}]))
    assert result.format_name == reader
    # counted once per record that has the key, whatever the number of items having it
    assert result.unused_nested_keys == {
        "locality.Forgetfulness.subject": 2,
        "portability.Reasoning.hop": 3,
    }


def test_zsre_portability_keys_are_all_used(tmp_path: Path) -> None:
    raw = zsre_raw(
        portability={"Recalled Relation": "(a, b, c)", "New Question": "q?", "New Answer": "a"}
    )
    assert read_records(write_json(tmp_path / "z.json", [raw])).unused_nested_keys == {}
    raw["portability"]["Source"] = "gpt4"
    flat = counterfact_raw(portability=raw["portability"])
    assert read_records(write_json(tmp_path / "z.json", [raw])).unused_nested_keys == {
        "portability.Source": 1
    }
    assert read_records(write_json(tmp_path / "c.json", [flat])).unused_nested_keys == {
        "portability.Source": 1
    }


@needs_data
def test_shared_subject_replace_file_portability_and_unused_keys() -> None:
    result = read_records(DATA / "counterfact/counterfact_subject_replace.json")
    assert all(len(r.portability["subject_replace"]) == 1 for r in result.records)
    assert result.unused_keys == {"attribute_prompts": 213}
    assert result.unused_nested_keys == {}


@needs_data
def test_shared_zsre_eval_unused_keys() -> None:
    result = read_records(DATA / "zsre/zsre_mend_eval_portability_gpt4.json")
    assert result.unused_keys == {"pred": 1037, "cond": 1037}
    assert result.unused_nested_keys == {}


@needs_data
@pytest.mark.parametrize(
    "name", ["knowedit/ZsRE/ZsRE-test-all.json", "knowedit/wiki_counterfact/train_cf.json"]
)
def test_shared_knowedit_group_items_use_every_key(name: str) -> None:
    assert read_records(DATA / name).unused_nested_keys == {}


def test_rome_groups_reach_the_evaluation_breakdown(tmp_path: Path) -> None:
    """A ROME file's portability and distracting prompts are scored: they are in summary.json."""

    from lit_edit.cli import evaluate_main

    raw = rome_raw(
        portability={"New Question": "Which continent is Camembert from?", "New Answer": "Asia"},
        distracting_neighborhood_prompts=["Camembert originates from Japan. Brie originates from"],
    )
    data = write_json(tmp_path / "rome.json", [raw])
    path = ft_config(tmp_path, data)
    evaluate_main(["--config", str(path)])
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    text = json.dumps(summary)
    for key in ("locality/distracting", "locality/neighborhood", "portability/one_hop"):
        assert key in text, key
    assert summary["portability"] is not None


def test_wise_temporal_ood_rephrase_reaches_the_evaluation_breakdown(tmp_path: Path) -> None:
    """WISE temporal's ood_rephrase is scored as its own generalization group in summary.json."""
    from lit_edit.cli import evaluate_main

    raw = wise_raw(rephrase_prompt="About ann lee:", ood_rephrase="Ann lee, in a later year:")
    path = ft_config(tmp_path, write_json(tmp_path / "temporal.json", [raw]))
    evaluate_main(["--config", str(path)])
    text = json.dumps(json.loads((tmp_path / "results" / "summary.json").read_text()))
    for key in ("generalization/ood", "generalization/rephrase"):
        assert key in text, key


def test_unused_keys_of_conversation_turns_are_listed(tmp_path: Path) -> None:
    turns = conversation_raw()["conversations"]
    raw = conversation_raw(conversations=[{**turns[0], "markdown": "x"}, turns[1]], lang="en")
    result = read_conversations(write_json(tmp_path / "lte.json", [raw, conversation_raw()]))
    assert result.unused_keys == {"lang": 1}
    assert result.unused_nested_keys == {"conversations.markdown": 1}
