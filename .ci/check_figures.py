#!/usr/bin/env python3
"""Check that the quick start printed the README's figures (run by .ci/run after the main job).

The README's quick-start figures are the table after the marker
``<!-- quickstart:figures RUN_DIR -->``: its header names ``summary.json`` keys, its one row the
values x100 at two decimals. The newest ``summary.json`` under ``RUN_DIR`` (written by the quick
start's evaluate command) must give exactly those strings; any difference fails with both.
Standard library only.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_figures(text: str) -> tuple[str, dict[str, str]]:
    """The run folder and ``{key: "12.34"}`` of the quick-start figures table."""
    match = re.search(r"<!-- quickstart:figures (\S+) -->\s*\n((?:\|.*\|\s*\n){3})", text)
    if match is None:
        raise SystemExit("README.md has no '<!-- quickstart:figures RUN_DIR -->' table")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in match.group(2).strip().splitlines()]
    header, values = rows[0], rows[2]
    return match.group(1), dict(zip(header, values, strict=True))


def main() -> int:
    """Compare; print the verdict; 0 when every figure matches."""
    run_dir, expected = readme_figures((ROOT / "README.md").read_text(encoding="utf-8"))
    summaries = sorted((ROOT / run_dir).rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    if not summaries:
        print(f"no summary.json under {run_dir}: did the quick start's evaluate run?")
        return 1
    summary = json.loads(summaries[-1].read_text())
    bad = []
    for key, want in expected.items():
        value = summary.get(key)
        got = "missing" if value is None else f"{100 * value:.2f}"
        if got != want:
            bad.append(f"  {key}: README {want}, this run {got}")
    env = summary.get("environment", {})
    print(f"quick-start figures ({summaries[-1].relative_to(ROOT)}; {env.get('torch_threads')} "
          f"torch thread(s), {env.get('cpu')}):")
    if bad:
        pre = summary.get("pre", {})
        print("differ from the README:\n" + "\n".join(bad))
        print("  pre-edit (depends on the TinyFacts build only): "
              + ", ".join(f"{k} {100 * v:.2f}" for k, v in pre.items()))
        print(f"  versions: {env.get('versions')}")
        return 1
    print("  " + ", ".join(f"{k} {v}" for k, v in expected.items()) + ": as in the README")
    return 0


if __name__ == "__main__":
    sys.exit(main())
