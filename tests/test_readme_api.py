"""The README's Python snippet runs as written and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet() -> str:
    """The fenced python block after ``<!-- python-api -->``."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- python-api -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no <!-- python-api --> python block"
    return match.group(1)


def test_readme_python_api_snippet_prints_what_it_says() -> None:
    code = snippet()
    expected = [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s*#\s*(.+)$", code, re.M)]
    assert len(expected) >= 3
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert out.getvalue().splitlines() == expected
