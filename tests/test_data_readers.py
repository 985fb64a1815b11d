"""Readers: exact counts and normalised fields on the shared data files, and synthetic records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_data_samples import (
    DATA,
    conversation_raw,
    counterfact_raw,
    knowedit_raw,
    needs_data,
    rome_raw,
    wise_raw,
    write_json,
    zsre_raw,
)

from lit_edit.data import (
    ConversationPair,
    CounterFactReader,
    KnowEditReader,
    RomeCounterFactReader,
    WiseReader,
    ZsreReader,
    available_readers,
    detect_reader,
    read_conversations,
    read_file,
    read_records,
    record_readers,
)
from lit_edit.records import DataFileError, EditRecord, QAPair

ZSRE_EVAL = "zsre/zsre_mend_eval_portability_gpt4.json"
ZSRE_TRAIN = "zsre/zsre_mend_train-1k.json"

COUNTS = [
    (ZSRE_EVAL, "zsre", 1037),
    ("counterfact/counterfact-train.json", "counterfact", 10000),
    ("counterfact/counterfact-val.json", "counterfact", 1919),
    ("counterfact/counterfact-edit.json", "counterfact", 10000),
    ("counterfact/counterfact_subject_replace.json", "counterfact_rome", 213),
    ("knowedit/ZsRE/ZsRE-test-all.json", "knowedit", 1304),
    ("knowedit/wiki_counterfact/train_cf.json", "knowedit", 1428),
    ("wise/hallucination/hallucination-edit.json", "wise", 600),
    ("wise/hallucination/hallucination-train.json", "wise", 306),
]


# --- shared files ---------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(("name", "fmt", "count"), COUNTS, ids=[c[0] for c in COUNTS])
def test_shared_file_counts_and_provenance(name: str, fmt: str, count: int) -> None:
    result = read_records(DATA / name)
    assert result.format_name == fmt
    assert len(result.records) == result.num_read == count
    assert result.skipped == []
    assert all(isinstance(r, EditRecord) for r in result.records)
    assert [r.index for r in result.records] == list(range(count))
    assert {r.source for r in result.records} == {str(DATA / name)}


@needs_data
def test_zsre_train_strict_names_file_record_and_field() -> None:
    with pytest.raises(DataFileError) as info:
        read_records(DATA / ZSRE_TRAIN)
    err = info.value
    assert (err.path, err.index, err.field) == (str(DATA / ZSRE_TRAIN), 534, "alt")
    assert "zsre_mend_train-1k.json" in str(err) and "record 534" in str(err)


@needs_data
def test_zsre_train_skip_invalid_reports_the_two_records(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lit_edit.data.reading"):
        result = read_records(DATA / ZSRE_TRAIN, skip_invalid=True)
    assert len(result.records) == 998
    assert result.skipped_indices == [534, 723]
    assert [e.field for e in result.skipped] == ["alt", "alt"]
    assert 534 not in {r.index for r in result.records}
    assert result.records[534].index == 535  # indices stay those of the file
    assert "skipped 2 invalid records" in caplog.text and "[534, 723]" in caplog.text


@needs_data
def test_zsre_eval_record_0_normalised() -> None:
    record = read_records(DATA / ZSRE_EVAL).records[0]
    assert record.prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert record.target_new == "2006"
    assert record.ground_truth == ("1998",)
    assert record.subject == "IAAF Combined Events Challenge"
    assert record.rephrase_prompts == ("When was the IAAF Combined Events Challenge launched?",)
    loc = QAPair("nq question: what is the name of the last episode of spongebob", "The String")
    assert record.locality == {"nq": (loc,)}
    (port,) = record.portability["one_hop"]
    assert port.answer == "Athletics"
    assert port.prompt.startswith("What type of sports event is the IAAF Combined Events")
    assert record.meta["cond"] == "2011 >> 2006 || " + record.prompt
    assert record.meta["pred"] == "2011"
    assert record.meta["loc_prompt"] == f"{loc.prompt} {loc.answer}"
    assert record.meta["recalled_relation"].startswith("(IAAF Combined Events Challenge")


@needs_data
def test_counterfact_flat_record_0_normalised() -> None:
    record = read_records(DATA / "counterfact/counterfact-edit.json").records[0]
    assert record.prompt == "The mother tongue of Danielle Darrieux is"
    assert (record.target_new, record.ground_truth) == ("English", ("French",))
    assert record.subject == "Danielle Darrieux"
    assert record.rephrase_prompts == (
        "Where Danielle Darrieux is from, people speak the language of",
    )
    assert record.locality == {
        "neighborhood": (QAPair("Michel Rocard is a native speaker of", "French"),)
    }
    assert record.meta == {"case_id": 0}


@needs_data
def test_counterfact_flat_splits_are_disjoint_and_cover_all_cases() -> None:
    ids = [
        {
            r.meta["case_id"]
            for r in read_records(DATA / f"counterfact/counterfact-{s}.json").records
        }
        for s in ("train", "val", "edit")
    ]
    assert sum(len(s) for s in ids) == len(set.union(*ids)) == 21919


@needs_data
def test_counterfact_rome_record_0_normalised() -> None:
    record = read_records(DATA / "counterfact/counterfact_subject_replace.json").records[0]
    assert record.prompt == "May Wright Sewall passed away in"
    assert (record.target_new, record.ground_truth) == ("Birmingham", ("Indianapolis",))
    assert record.subject == "May Wright Sewall"
    assert len(record.rephrase_prompts) == 2
    assert record.rephrase_prompts[1].endswith("May Wright Sewall's life ended in")
    neighborhood = record.locality["neighborhood"]
    assert len(neighborhood) == 10
    assert neighborhood[0] == QAPair("Jake Weber succumbed at", "Indianapolis")
    assert {p.answer for p in neighborhood} == {"Indianapolis"}
    assert len(record.generation_prompts) == 10
    assert record.meta["case_id"] == 4496 and record.meta["pararel_idx"] == 12032
    assert record.meta["relation_id"] == "P20"
    assert "alternative_subject" not in record.meta
    assert record.portability == {
        "subject_replace": (QAPair("Mary Eliza Wright passed away in", "Birmingham"),)
    }
    assert (record.meta["target_new_id"], record.meta["target_true_id"]) == ("Q2256", "Q6346")
    assert len(record.meta["attribute_prompts"]) == 10


@needs_data
def test_knowedit_zsre_record_0_keeps_group_names() -> None:
    record = read_records(DATA / "knowedit/ZsRE/ZsRE-test-all.json").records[0]
    assert record.prompt == "Which family does Epaspidoceras belong to?"
    assert (record.target_new, record.ground_truth) == ("Noctuidae", ("Aspidoceratidae",))
    assert record.rephrase_prompts == ("What family are Epaspidoceras?",)
    assert record.locality == {
        "Relation_Specificity": (
            QAPair("The taxon rank of Epaspidoceras is", "genus"),
            QAPair("Epaspidoceras taxon rank", "genus"),
        )
    }
    assert list(record.portability) == ["Reasoning"]
    assert record.portability["Reasoning"][0].answer == "Owlet moths"
    assert record.meta == {"cond": "Geometridae >> Noctuidae || " + record.prompt}


@needs_data
def test_knowedit_train_cf_empty_values_are_dropped_with_notes() -> None:
    result = read_records(DATA / "knowedit/wiki_counterfact/train_cf.json")
    assert [(n.index, n.field) for n in result.notes] == [
        (326, "locality.Forgetfulness[0].ground_truth"),
        (489, "locality.Relation_Specificity[0].ground_truth"),
        (630, "ground_truth"),
    ]
    assert result.records[630].ground_truth == ()
    assert result.records[630].target_new == "Steen, Tidemann"
    assert "Relation_Specificity" not in result.records[489].locality
    groups = {k for r in result.records for k in (*r.portability, *r.locality)}
    expected = {"Reasoning", "Subject_Aliasing", "Logical_Generalization"}
    assert groups == expected | {"Relation_Specificity", "Forgetfulness"}


@needs_data
def test_wise_hallucination_records_and_empty_locality_notes() -> None:
    result = read_records(DATA / "wise/hallucination/hallucination-edit.json")
    record = result.records[0]
    assert record.subject == "carole gist"
    assert record.target_new.startswith("She was also the first contestant from Michigan")
    assert record.ground_truth == ()
    assert record.locality["neighborhood"][0].answer.startswith("l print or plan?")
    empty = [86, 90, 171, 172, 238, 314, 432]
    assert [n.index for n in result.notes] == empty
    assert {n.field for n in result.notes} == {"locality_ground_truth"}
    assert all(result.records[i].locality == {} for i in empty)
    assert sum(1 for r in result.records if r.locality) == 600 - len(empty)


@needs_data
def test_forced_format_reads_the_same_records() -> None:
    detected = read_records(DATA / ZSRE_EVAL).records
    forced = read_records(DATA / ZSRE_EVAL, format="zsre").records
    assert forced == detected


# --- synthetic records: mapping of each reader ------------------------------------------------


def test_zsre_reader_without_portability() -> None:
    record = ZsreReader().parse(zsre_raw(), 5, "f.json")
    assert record.prompt == "Which country is Paris in?"
    assert (record.target_new, record.ground_truth) == ("Italy", ("France",))
    assert record.locality == {"nq": (QAPair("nq question: who wrote hamlet", "Shakespeare"),)}
    assert record.portability == {}
    assert (record.source, record.index) == ("f.json", 5)
    assert record.meta == {
        "pred": "France",
        "cond": "France >> Italy || Which country is Paris in?",
        "loc_prompt": "nq question: who wrote hamlet Shakespeare",
    }


def test_knowedit_reader_normalises_alias_lists() -> None:
    record = KnowEditReader().parse(knowedit_raw(), 0)
    assert record.ground_truth == ("Globex", "Globex Corp", "Initech")
    assert record.portability["Subject_Aliasing"] == (QAPair("Annie works for", "Acme", ("ACME",)),)
    assert record.portability["Reasoning"] == (QAPair("The CEO of Ann's employer is", "Wile"),)
    assert record.locality == {"Relation_Specificity": (QAPair("Ann was born in", "Oslo"),)}


def test_knowedit_reader_single_object_group_and_missing_optionals() -> None:
    raw = knowedit_raw(locality={"Forgetfulness": {"prompt": "Ann likes", "ground_truth": "tea"}})
    del raw["rephrase_prompt"], raw["ground_truth"], raw["subject"]
    record = KnowEditReader().parse(raw, 0)
    assert record.locality == {"Forgetfulness": (QAPair("Ann likes", "tea"),)}
    assert record.rephrase_prompts == () and record.ground_truth == ()
    assert record.subject is None


def test_rome_reader_formats_the_subject_slot() -> None:
    record = RomeCounterFactReader().parse(rome_raw(), 0)
    assert record.prompt == "Camembert originates from"
    assert (record.target_new, record.ground_truth) == ("Japan", ("France",))
    assert record.locality["neighborhood"] == (
        QAPair("Brie originates from", "France"),
        QAPair("Roquefort originates from", "France"),
    )
    assert record.meta["attribute_prompts"] == ["Sushi originates from"]
    assert "alternative_subject" not in record.meta


def test_wise_reader_optional_rephrase() -> None:
    record = WiseReader().parse(wise_raw(rephrase_prompt="About ann lee:"), 0)
    assert record.rephrase_prompts == ("About ann lee:",)
    assert record.locality == {"neighborhood": (QAPair("The weather today is", "sunny and warm"),)}


def test_counterfact_reader_keeps_unknown_fields_in_meta() -> None:
    record = CounterFactReader().parse(counterfact_raw(extra={"a": 1}), 0)
    assert record.meta == {"case_id": 7, "extra": {"a": 1}}


# --- detection ------------------------------------------------------------------------------


SAMPLES = {
    "zsre": zsre_raw(),
    "zsre_portability": zsre_raw(portability={"New Question": "Q?", "New Answer": "A"}),
    "counterfact": counterfact_raw(),
    "counterfact_rome": rome_raw(),
    "knowedit": knowedit_raw(),
    "wise": wise_raw(),
    "lte": conversation_raw(),
}


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_each_sample_is_matched_by_exactly_one_reader(sample: str) -> None:
    matching = [r.format_name for r in available_readers() if r.matches(SAMPLES[sample])]
    assert matching == [sample.removesuffix("_portability")]
    assert detect_reader(SAMPLES[sample]).format_name == matching[0]


def test_record_readers_exclude_the_conversation_reader() -> None:
    names = [r.format_name for r in record_readers()]
    assert names == ["zsre", "counterfact", "counterfact_rome", "knowedit", "wikibio", "wise"]
    assert len({type(r) for r in available_readers()}) == len(names) + 1


def test_detection_uses_the_first_record(tmp_path: Path) -> None:
    path = write_json(tmp_path / "mixed.json", [counterfact_raw(), zsre_raw()])
    with pytest.raises(DataFileError) as info:
        read_records(path)
    assert info.value.index == 1 and info.value.field == "prompt"  # read as counterfact


def test_jsonl_is_supported_with_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "z.jsonl"
    lines = [json.dumps(zsre_raw(alt=f"A{i}")) for i in range(3)]
    path.write_text(lines[0] + "\n\n" + lines[1] + "\r\n" + lines[2] + "\n", encoding="utf-8")
    result = read_records(path)
    assert result.format_name == "zsre"
    assert [(r.index, r.target_new) for r in result.records] == [(0, "A0"), (1, "A1"), (2, "A2")]


def test_json_with_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "z.json"
    text = json.dumps([zsre_raw()], indent=2).replace("\n", "\r\n")
    path.write_bytes(("\ufeff" + text).encode("utf-8"))
    assert read_records(path).records[0].target_new == "Italy"


# --- LTE conversations ----------------------------------------------------------------------


def test_read_conversations_single_and_multi_turn(tmp_path: Path) -> None:
    multi = conversation_raw(
        id="c1",
        conversations=[
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Capital of Peru?"},
            {"from": "gpt", "value": "Lima"},
        ],
    )
    no_id = conversation_raw()
    del no_id["id"]
    path = write_json(tmp_path / "lte.json", [conversation_raw(), multi, no_id])
    result = read_conversations(path)
    assert result.format_name == "lte" and result.num_read == 3
    assert result.records == [
        ConversationPair(
            "What is the capital of France?", "Paris", "identity_0_zsre", 0, (), str(path), 0
        ),
        ConversationPair("Hi", "Hello", "c1", 0, (), str(path), 1),
        ConversationPair("Capital of Peru?", "Lima", "c1", 1, (("Hi", "Hello"),), str(path), 1),
        ConversationPair("What is the capital of France?", "Paris", "2", 0, (), str(path), 2),
    ]
    assert result.records[2].to_dict()["history"] == [["Hi", "Hello"]]


def test_lte_template_sample_is_kept_verbatim(tmp_path: Path) -> None:
    human = (
        "Please acknowledge the updated information provided below and respond to the "
        "subsequent question.\n\n[Updated Information]:\n1. Paris is in Italy\n2. Rome is in "
        "Spain\n\n[Question]:\nWhich country is Paris in?"
    )
    raw = conversation_raw(
        conversations=[{"from": "human", "value": human}, {"from": "gpt", "value": "Italy"}]
    )
    path = tmp_path / "lte.jsonl"
    path.write_text(json.dumps(raw) + "\n", encoding="utf-8")
    (pair,) = read_conversations(path).records
    assert (pair.prompt, pair.answer) == (human, "Italy")


def test_conversation_file_is_refused_by_read_records(tmp_path: Path) -> None:
    path = write_json(tmp_path / "lte.json", [conversation_raw()])
    with pytest.raises(DataFileError, match="'lte' format"):
        read_records(path)
    assert read_file(path).format_name == "lte"
