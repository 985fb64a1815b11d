"""LTE knowledge retention: what the aligned model still knows, beside the model it started from.

    python bench/lte_retention.py checkpoints/lte/tinyfacts/lte.ckpt [more.ckpt ...] [--n 150]

Alignment fine-tunes the whole model; the editing metrics cannot show what it forgot, because
locality compares the edited model with the *aligned* model before the edit. This prints, for the
TinyFacts base model and each LTE checkpoint, the generation exact match (greedy, the ``*_em``
metrics' definition) of the bare questions (no fact in the prompt) about the subjects of the
first ``--n`` training and test records: each record's edit question (answer: the true object)
and its locality questions (other relations of the subject, other subjects with the same
relation), side by side in one run.
"""

from __future__ import annotations

import argparse

import torch


def bare_accuracy(editor, records) -> tuple[float, int]:
    """Generation exact match (the EM metrics' definition) of the records' bare true-fact questions.

    Args:
        editor: An ``LTEEditor`` with an empty memory (questions are asked bare, chat-wrapped).
        records: TinyFacts edit records.

    Returns:
        ``(accuracy, number of questions)``.
    """
    from lit_edit.metrics import answer_matches
    from lit_edit.records import QAPair

    pairs = [QAPair(r.prompt, r.ground_truth[0]) for r in records]
    pairs += [p for r in records for g in r.locality.values() for p in g]
    answers = editor.generate_answers(pairs)
    return sum(answer_matches(a) for a in answers) / len(pairs), len(pairs)


def main() -> None:
    """Print the bare-question accuracy of the base model and of each checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="LTEEditor checkpoints (full or LoRA)")
    parser.add_argument("--backbone", default="tinyfacts", help="TinyFacts model the LTE runs use")
    parser.add_argument("--n", type=int, default=150, help="records per split")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lit_edit.environment import environment_line

    print(environment_line(), flush=True)

    from lit_edit.data import TinyFactsDataModule
    from lit_edit.methods import LTEEditor

    data = TinyFactsDataModule(world=args.backbone, n_test=1000, n_val=50)
    data.setup("fit")
    data.setup("test")
    splits = {s: data.records[s][: args.n] for s in ("train", "test")}
    print(f"bare greedy exact match on {args.n} records' subjects per split (edit + locality Qs)")
    print(f"  {'model':<48} {'train subjects':>15} {'test subjects':>15}")
    models = [("base " + args.backbone, None), *((c, c) for c in args.checkpoints)]
    for name, ckpt in models:
        if ckpt is None:
            editor = LTEEditor(backbone=args.backbone)
        else:
            editor = LTEEditor.load_from_checkpoint(ckpt, map_location="cpu")
        editor.eval()
        if len(editor.memory):
            raise SystemExit(f"{name} holds {len(editor.memory)} edits: not a bare question")
        cells = [bare_accuracy(editor, splits[s]) for s in ("train", "test")]
        row = " ".join(f"{100 * acc:10.1f} ({n})" for acc, n in cells)
        print(f"  {name[-48:]:<48} {row}")


if __name__ == "__main__":
    main()
