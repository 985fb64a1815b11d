"""evaluate.py end to end on the embedded default (and on the shared real data when present)."""

import json
from pathlib import Path

import pytest
import torch

from lit_edit.cli import evaluate_main
from lit_edit.editing import ParameterSnapshot
from lit_edit.methods import FTEditor, IKEEditor
from lit_edit.world import load_world, resolve_tinyfacts

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared reference data not found at {SHARED}"
)


def run(config: str, tmp_path: Path, *extra: str):
    out = tmp_path / "results"
    cli = evaluate_main(
        [
            "--config", str(ROOT / config),
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--evaluation.results_dir", str(out),
            *extra,
        ]
    )
    return cli, out


@pytest.mark.parametrize("config", ["configs/ft/tinyfacts.yaml", "configs/ike/tinyfacts.yaml"])
def test_evaluate_writes_the_results_folder(config, tmp_path, capsys):
    cli, out = run(config, tmp_path, "--data.init_args.n_test", "6")
    printed = capsys.readouterr().out
    assert "| Method | Edit Succ. | Generalization | Portability | Locality | Fluency |" in printed
    assert str(out.resolve()) in printed
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    test_records = cli.datamodule.records["test"]
    assert sorted(r["index"] for r in rows) == sorted(r.index for r in test_records)
    by_index = {r.index: r for r in test_records}
    for row in rows:
        record = by_index[row["index"]]
        for key in ("reliability", "locality", "fluency"):
            assert 0.0 <= row["post"][key] <= (1.0 if key != "fluency" else 20.0)
        # None exactly when the record has nothing of that kind to score
        assert (row["post"]["generalization"] is None) == (not record.rephrase_prompts)
        assert (row["post"]["portability"] is None) == (not record.portability)
        assert row["pre"]["locality"] is None and row["pre"]["reliability"] is not None
        # the audit trail: the recorded argmax tokens give the record's locality (mean over
        # groups of the mean per-pair agreement, EasyEdit's "keys" aggregation)
        groups = row["locality_tokens"]
        assert set(groups) == set(record.locality)
        per_group = [
            sum(sum(a == b for a, b in zip(t["pre"], t["post"], strict=True)) / len(t["pre"])
                for t in pairs) / len(pairs)
            for pairs in groups.values()
        ]
        assert row["post"]["locality"] == pytest.approx(sum(per_group) / len(per_group))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("reliability", "generalization", "locality", "portability"):
        assert 0.0 <= summary[key] <= 1.0
    # the summary is the mean of the per-record values
    assert summary["reliability"] == pytest.approx(
        sum(r["post"]["reliability"] for r in rows) / len(rows)
    )
    assert summary["protocol"] == {"protocol": "single", "parallel": 1}
    assert summary["n_records"] == 6
    assert (out / "table.md").read_text().startswith("| Method | Edit Succ.")
    assert (out / "sequential.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sequential_protocol_from_the_command_line(tmp_path):
    _, out = run(
        "configs/ft/tinyfacts.yaml",
        tmp_path,
        "--data.init_args.n_test", "4",
        "--evaluation.protocol", "lit_edit.protocols.SequentialEdit",
        "--evaluation.protocol.group_size", "2",
        "--evaluation.protocol.evaluate", "after_each",
        "--evaluation.fluency", "false",
    )
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted((r["group"], r["position"], r["edits_applied"]) for r in rows) == [
        (0, 0, 1), (0, 1, 2), (1, 0, 1), (1, 1, 2)
    ]
    summary = json.loads((out / "summary.json").read_text())
    expected = {"protocol": "sequential", "group_size": 2, "evaluate": "after_each"}
    assert summary["protocol"] == expected


@pytest.fixture(scope="module")
def tiny_records():
    return load_world(resolve_tinyfacts("tinyfacts")).edit_records(4, seed=1)


def test_ft_edit_changes_only_the_inner_parameter_and_restores_bit_exactly(tiny_records):
    editor = FTEditor(lr=1e-2, steps=3, early_stop_loss=None)
    before = ParameterSnapshot(editor)
    handle = editor.edit(tiny_records[:2])
    changed = before.differences(editor)
    assert changed == ["model." + n for n in editor.inner_names] or sorted(changed) == sorted(
        "model." + n for n in editor.inner_names
    )
    handle.restore()
    assert before.differences(editor) == []
    assert not any(p.requires_grad for p in editor.parameters())


def test_ft_edit_raises_the_target_probability(tiny_records):
    editor = FTEditor(lr=1e-2, steps=10, early_stop_loss=None)
    pair = tiny_records[0].edit_pair
    before = editor.score_pairs([pair])[0].nll
    with editor.edit([tiny_records[0]]):
        after = editor.score_pairs([pair])[0].nll
    assert after < before
    assert editor.score_pairs([pair])[0].nll == pytest.approx(before, abs=0)


def test_ike_puts_the_fact_in_context_and_forgets_it_on_restore(tiny_records):
    editor = IKEEditor()
    record = tiny_records[0]
    assert editor.contextualise(["Q?"]) == ["Q?"]
    with editor.edit([record]):
        assert editor.contextualise(["Q?"]) == [f"New Fact: {record.fact}\nPrompt: Q?"]
        in_context = editor.score_pairs([record.edit_pair])[0]
    assert editor.memory == []
    bare = editor.score_pairs([record.edit_pair])[0]
    assert torch.equal(in_context.answer_ids, bare.answer_ids)


def test_restore_verification_catches_a_broken_editor(tmp_path):
    class Leaky(FTEditor):
        def edit(self, records):
            handle = super().edit(records)
            with torch.no_grad():
                self.model.lm_head.weight[0, 0] += 1.0  # not undone by the handle
            return handle

    import lightning as L

    from lit_edit.data.tinyfacts import TinyFactsDataModule
    from lit_edit.evaluation import Evaluation

    editor = Leaky(steps=1)
    editor.evaluation = Evaluation(
        verify_restore=True, exact_match=False, results_dir=str(tmp_path)
    )
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="bit-exactly"):
        trainer.test(editor, datamodule=TinyFactsDataModule(n_test=2, n_val=0))


@needs_shared
@pytest.mark.parametrize(
    "config",
    ["configs/ft/zsre.yaml", "configs/ike/counterfact.yaml", "configs/ft/counterfact.yaml"],
)
def test_evaluate_on_shared_real_data(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs give the data path relative to the repository root
    _, out = run(config, tmp_path, "--data.init_args.max_test_records", "4")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_records"] == 4
    for key in ("reliability", "locality"):
        assert 0.0 <= summary[key] <= 1.0
    if "counterfact" in config:
        assert summary["ES"] is not None and 0.0 <= summary["ES"] <= 1.0
