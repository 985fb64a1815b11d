"""Post-edit reliability of a TinyFacts results folder, grouped by subject and answer length.

Reads ``records.jsonl`` of an ``evaluate.py`` run on a TinyFacts world, looks each record up in
that world's first ``--n-test`` held-out test records (the run's ``n_test``), and prints the
mean post-edit reliability (×100) of the records whose subject is one token of the world's
tokenizer and of those whose subject is longer, and the same for the answer (``target_new``).
This is how the README's "Where the single edits fail" (ROME) was measured:

    python evaluate.py --config configs/rome/tinyfacts.yaml --evaluation.fluency false \\
        --evaluation.results_dir runs/extra/rome-single-w0
    python bench/subject_tokens.py runs/extra/rome-single-w0 --world tinyfacts-4l --n-test 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    """Group and print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results folder holding records.jsonl")
    parser.add_argument("--world", default="tinyfacts-4l", help="the run's TinyFacts world")
    parser.add_argument("--n-test", type=int, default=200, help="the run's n_test")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from lit_edit.data import TinyFactsDataModule
    from lit_edit.world import resolve_tinyfacts

    records = TinyFactsDataModule(world=args.world, n_test=args.n_test).load_records("test")
    by_index = {r.index: r for r in records["test"]}
    tokenizer = AutoTokenizer.from_pretrained(resolve_tinyfacts(args.world))
    rows = [json.loads(line) for line in (args.results / "records.jsonl").open()]
    missing = [row["index"] for row in rows if row["index"] not in by_index]
    if missing:
        raise SystemExit(f"{args.results}/records.jsonl: records {missing[:5]} are not among the "
                         f"first {args.n_test} test records of {args.world} (wrong --n-test?)")

    def length(text: str) -> int:
        """Tokens of ``text`` as it follows a space in a prompt."""
        return len(tokenizer.tokenize(" " + text))

    groups: dict[str, list[float]] = {}
    for row in rows:
        record = by_index[row["index"]]
        for part, text in (("subject", record.subject), ("answer", record.target_new)):
            key = f"{part} of one token" if length(text) == 1 else f"{part} of 2+ tokens"
            groups.setdefault(key, []).append(row["post"]["reliability"])
    for key in sorted(groups):
        values = groups[key]
        mean = 100 * sum(values) / len(values)
        print(f"{key:22s} {len(values):4d} records  reliability {mean:.2f}")


if __name__ == "__main__":
    main()
