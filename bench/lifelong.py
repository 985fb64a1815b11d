"""The lifelong picture: every method at T = 100 on the same records of three TinyFacts worlds.

Each world's 200 held-out test records (the records of every TinyFacts table in the README) are
edited in 2 sequential groups of 100 (``SequentialEdit(group_size=100,
evaluate="after_group")``: every record scored on the model after its group's last edit, then
rolled back; fluency off; locality leaves out the pairs about a fact another edit in effect
changed), with ``configs/wise/tinyfacts_t100.yaml`` as the overlay or its flags:

* WISE, FT-M, ROME, MEMIT, AlphaEdit and ECE (nothing to train; the last four on each world's
  ``tinyfacts-4l`` model, one edit per call): ``python bench/seeds.py --config
  configs/<m>/tinyfacts.yaml --tag t100 --eval-args --config configs/wise/tinyfacts_t100.yaml``
  (into ``runs/seeds/<m>-tinyfactst100/``);
* MEND and LTE: the world's trained checkpoint of ``bench/seeds.py`` (``runs/seeds/mend-tinyfacts/
  seedN``, ``runs/seeds/lte-tinyfacts/seedN``; trained first if missing), evaluated with the
  overlay's settings into ``runs/lifelong/<m>/seedN``.

A run whose ``summary.json`` exists is not repeated (``--force``: again). Every config fixes
its thread count (1), so the figures do not depend on the machine's load.

    python bench/lifelong.py                 # run what is missing, print the table
    python bench/lifelong.py --worlds 0 --methods wise ft
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OVERLAY = "configs/wise/tinyfacts_t100.yaml"
NAMES = {"wise": "WISE (Merge)", "ft": "FT-M", "mend": "MEND", "lte": "LTE", "rome": "ROME",
         "memit": "MEMIT", "alphaedit": "AlphaEdit", "ece": "ECE"}


def t100_flags() -> list[str]:
    """The overlay's protocol and evaluation settings as flags (for configs of other data)."""
    return ["--evaluation.protocol", "lit_edit.protocols.SequentialEdit",
            "--evaluation.protocol.group_size", "100",
            "--evaluation.protocol.evaluate", "after_group",
            "--evaluation.fluency", "false", "--evaluation.locality_conflicts", "exclude"]


def run(cmd: list[str], log: Path) -> None:
    """Run ``cmd`` in the repository, its output into ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        subprocess.run(cmd, cwd=REPO, check=True, stdout=out, stderr=subprocess.STDOUT)


def untrained(method: str, world: int, force: bool) -> Path:
    """A method without training on ``world`` through ``bench/seeds.py``; its results folder."""
    results = REPO / "runs" / "seeds" / f"{method}-tinyfactst100" / f"seed{world}" / "results"
    if force or not (results / "summary.json").is_file():
        run([sys.executable, "bench/seeds.py", "--config", f"configs/{method}/tinyfacts.yaml",
             "--tag", "t100", "--jobs", "1", "--worlds", str(world),
             *(["--force"] if force else []), "--eval-args", "--config", OVERLAY],
            results.parent / "lifelong.log")
    return results


def trained(method: str, world: int, force: bool) -> Path:
    """MEND or LTE on ``world`` from its ``bench/seeds.py`` checkpoint; its results folder."""
    seeds = REPO / "runs" / "seeds" / f"{method}-tinyfacts" / f"seed{world}"
    checkpoint = next(iter(sorted((seeds / "ckpt").glob("*.ckpt"))), None) if method == "lte" \
        else seeds / "ckpt" / "final.ckpt"
    if checkpoint is None or not checkpoint.is_file():
        run([sys.executable, "bench/seeds.py", "--config", f"configs/{method}/tinyfacts.yaml",
             "--fit", "--jobs", "1", "--worlds", str(world)], seeds.parent / f"fit{world}.log")
        checkpoint = next(iter(sorted((seeds / "ckpt").glob("*.ckpt"))))
    results = REPO / "runs" / "lifelong" / method / f"seed{world}"
    if force or not (results / "summary.json").is_file():
        data = (["--data.init_args.edits.init_args.n_test", "200", *t100_flags()]
                if method == "lte" else ["--config", OVERLAY])
        run([sys.executable, "evaluate.py", "--config", str(seeds / "config.yaml"),
             "--ckpt_path", str(checkpoint), *data, "--evaluation.results_dir", str(results)],
            results.parent / f"seed{world}.log")
    return results


def main() -> None:
    """Run what is missing and print one table (x100) per metric."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(NAMES), default=list(NAMES))
    parser.add_argument("--worlds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for method in args.methods:
        for world in args.worlds:
            get = trained if method in ("mend", "lte") else untrained
            folder = get(method, world, args.force)
            rows.setdefault(method, {})[world] = json.loads((folder / "summary.json").read_text())
    print(f"T = 100 (2 groups of 100 of the 200 held-out records), after each group's last "
          f"edit, x100; worlds {args.worlds}")
    print("| method | " + " | ".join(f"rel / gen / loc, world {w}" for w in args.worlds)
          + " | mean rel / gen / loc |")
    print("|---|" + "---|" * (len(args.worlds) + 1))
    for method, worlds in rows.items():
        cells, means = [], {"reliability": [], "generalization": [], "locality": []}
        for w in args.worlds:
            s = worlds[w]
            cells.append(" / ".join(f"{100 * s[k]:.1f}" for k in means))
            for k in means:
                means[k].append(100 * s[k])
        mean = " / ".join(f"{sum(v) / len(v):.1f}" for v in means.values())
        print(f"| {NAMES[method]} | " + " | ".join(cells) + f" | {mean} |")


if __name__ == "__main__":
    main()
