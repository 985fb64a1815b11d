"""ECE's edit throughput against AlphaEdit's, side by side in one run (issue #17: ≥ 3×).

Both editors are built on the same backbone (``tinyfacts-4l``) with the settings of their
TinyFacts configs (``configs/ece/tinyfacts.yaml``, ``configs/alphaedit/tinyfacts.yaml``; ECE
variants by ``--ece KEY=VALUE`` overrides), edit the same batch of the first ``--edits`` test
records of world 0 (the configs' data split), restore, and alternate for ``--rounds`` rounds;
the best wall time of each is kept (after one small warm-up edit each, which fills the ``C``
caches). Prints edits/s of each and the ratio ECE / AlphaEdit.

    python bench/ece.py [--edits 100] [--rounds 2] [--threads 1] [--ece n_clusters=1 ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def init_args(config: str) -> tuple[str, dict]:
    """Class path and ``init_args`` of a config's model."""
    model = yaml.safe_load((REPO / config).read_text())["model"]
    return model["class_path"], dict(model["init_args"])


def build(config: str, overrides: dict):
    """The editor of ``config`` with ``overrides``."""
    import lit_edit.methods as methods

    class_path, args = init_args(config)
    return getattr(methods, class_path.rsplit(".", 1)[-1])(**{**args, **overrides})


def edit_seconds(editor, records) -> float:
    """Wall seconds of one batch edit of ``records`` (restored afterwards)."""
    from lit_edit.editor import apply_edit

    start = time.perf_counter()
    handle = apply_edit(editor, records)
    seconds = time.perf_counter() - start
    handle.restore()
    return seconds


def parse_value(text: str):
    """A ``--ece`` value as YAML (numbers, booleans, lists)."""
    return yaml.safe_load(text)


def main() -> None:
    """Time and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ece", nargs="*", default=[], help="ECE overrides KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from lit_edit.data import TinyFactsDataModule

    records = TinyFactsDataModule(world="tinyfacts-4l", n_test=1000).load_records("test")["test"]
    batch = records[: args.edits]
    overrides = dict(item.split("=", 1) for item in args.ece)
    overrides = {k: parse_value(v) for k, v in overrides.items()}
    editors = {
        "AlphaEdit": build("configs/alphaedit/tinyfacts.yaml", {}),
        "ECE": build("configs/ece/tinyfacts.yaml", overrides),
    }
    for editor in editors.values():  # warm-up: C of each layer computed and cached
        edit_seconds(editor, records[-5:])
    best = {name: float("inf") for name in editors}
    for _ in range(args.rounds):
        for name, editor in editors.items():
            best[name] = min(best[name], edit_seconds(editor, batch))
    print(f"batch of {len(batch)} edits, {args.threads} thread(s), best of {args.rounds}; "
          f"ECE overrides {overrides or 'none'}")
    for name, seconds in best.items():
        print(f"  {name:9s} {seconds:7.2f} s  {len(batch) / seconds:6.2f} edits/s")
    print(f"  ratio ECE / AlphaEdit throughput: {best['AlphaEdit'] / best['ECE']:.2f}x")


if __name__ == "__main__":
    main()
