"""What the command lines print matches the README."""

from __future__ import annotations

import pytest


def test_world_show_prints_one_record_as_the_readme_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lit_edit.world.__main__ import main as world_main

    assert world_main(["show"]) == 0
    assert capsys.readouterr().out.count('"target_new"') == 1
