"""How many locality questions another edit of the same group changes (TinyFacts).

    python bench/locality_conflicts.py [--n 1000] [--sizes 1 10 100 1000]

Batch and sequential protocols put many edits in the model at once. A record's locality
question ("X lives in", when the record edits "X was born in") may ask about a fact that another
edit in the model changed: its answer *should* change, yet the locality metric (agreement with
the unedited model) counts that as damage. For the first ``--n`` TinyFacts test records cut into
groups of each size (as ``SingleEdit``, ``BatchEdit`` and ``SequentialEdit`` with that group size
cut them), this prints the share of locality questions, per locality group, that ask about the
fact another record of the group edits (:mod:`lit_edit.conflicts`: its question, or its subject
named with its old object as the answer), all edits of the group in effect. ``evaluate.py
--evaluation.locality_conflicts exclude`` leaves exactly these out of locality.
"""

from __future__ import annotations

import argparse
from collections import Counter


def main() -> None:
    """Print the share of conflicting locality questions per group size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="test records")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 1000],
                        help="edits in the model at once")
    parser.add_argument("--world", default="tinyfacts", help="TinyFacts model whose world to use")
    args = parser.parse_args()
    from lit_edit.environment import environment_line

    print(environment_line(), flush=True)

    from lit_edit.conflicts import first_conflicts
    from lit_edit.data import TinyFactsDataModule

    data = TinyFactsDataModule(world=args.world, n_test=args.n)
    data.setup("test")
    records = data.records["test"]
    print(f"locality questions another edit of the group changed ({len(records)} test records)")
    for size in args.sizes:
        total: Counter[str] = Counter()
        changed: Counter[str] = Counter()
        for start in range(0, len(records), size):
            for groups in first_conflicts(records[start : start + size]):
                for name, firsts in groups.items():
                    total[name] += len(firsts)
                    changed[name] += sum(j is not None for j in firsts)
        cells = "  ".join(
            f"{name} {changed[name]}/{total[name]} ({100 * changed[name] / total[name]:.1f} %)"
            for name in sorted(total)
        )
        print(f"  {size:>5} at once: {cells}")


if __name__ == "__main__":
    main()
