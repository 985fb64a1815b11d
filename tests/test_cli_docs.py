"""What the command lines print matches the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_edit.cli import evaluate_main

ROOT = Path(__file__).resolve().parents[1]


def test_world_show_prints_one_record_as_the_readme_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lit_edit.world.__main__ import main as world_main

    assert world_main(["show"]) == 0
    assert capsys.readouterr().out.count('"target_new"') == 1


def test_evaluate_prints_the_tables_in_the_readme_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate_main(
        [
            "--config",
            str(ROOT / "configs" / "ft" / "tinyfacts.yaml"),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--evaluation.results_dir",
            str(tmp_path / "results"),
            "--data.init_args.n_test",
            "2",
        ]
    )
    out = capsys.readouterr().out
    rich, knowedit = out.find("Test metric"), out.find("| Method | Edit Succ. | Generalization")
    prepost, path = out.find("| Metric | Pre-edit | Post-edit |"), out.find("Results written to")
    assert 0 <= rich < knowedit < prepost < path
    assert out.count("| Method |") == 1
    # the printed KnowEdit-layout columns are the README method table's, in its order (the
    # README adds the command to the method column and the wall time at the end)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = next(
        line for line in readme.splitlines() if line.startswith("| method (command) |")
    )
    printed = next(line for line in out.splitlines() if line.startswith("| Method |"))
    columns = [c.strip() for c in documented.strip("|").split("|")]
    assert columns[0] == "method (command)" and columns[-1] == "wall"
    assert [c.strip() for c in printed.strip("|").split("|")] == ["Method", *columns[1:-1]]


def test_readme_data_table_has_a_row_per_format() -> None:
    """Every format a reader reads has its row (format, files, fields → groups) in README Data."""
    from lit_edit.data.detect import available_readers

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Data\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = [row.split("|")[1].strip().strip("`") for row in rows]
    assert sorted(documented) == sorted(r.format_name for r in available_readers())
    assert all(row.count("|") == 7 for row in rows)  # six columns, none left out
