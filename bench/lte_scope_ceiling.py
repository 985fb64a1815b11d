"""The portability an LTE retriever can reach on TinyFacts: the aligned model under oracle scopes.

    python bench/lte_scope_ceiling.py [--ckpt checkpoints/lte/tinyfacts/lte.ckpt] [--n 200]

Runs the real single-edit evaluation (``evaluate.py`` with ``configs/lte/tinyfacts.yaml``) of the
aligned model on the first ``--n`` held-out records several times, each with a different rule
deciding which questions get the edit's fact in the prompt:

* ``cosine 0.8`` — the retriever (all-MiniLM-L6-v2) with a cosine threshold of 0.8
  (``configs/lte/eval_threshold.yaml``);
* ``learned scope`` — the shipped retriever: the checkpoint's scope head decides;
* ``names subject`` — an oracle given the record's labels that puts the fact before exactly the
  edit question, its rephrases and the portability questions whose text names the edited
  subject; no locality question gets it. This bounds every retriever that links a question to
  an edit through the text of the question (a perfect one included);
* ``in scope`` — an oracle that also puts it before the portability questions that do not name
  the subject (the subject's alias; a two-hop question about another entity whose chain passes
  through the edited one).

It also measures whether the model itself could link an alias to its subject: the greedy
continuation of ``"<subject> is also known as"`` compared with the alias, for the base and the
aligned model (the world pretrains every such statement); and, for a checkpoint with a learned
scope, which questions its head puts in the scope of an edit: the edited subject's alias
questions, and as controls the alias questions of *another* subject with the same relation
(same shape, other entity: accepting them would mean the head learned the shape of alias
questions, not the entity), the neighbourhood and the other-relation locality questions.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_edit.nn.retrieval import EditMemory, Retrieved
from lit_edit.records import EditRecord

_CONFIG = "configs/lte/tinyfacts.yaml"


def admitted(record: EditRecord, mode: str) -> set[str]:
    """The questions an oracle scope puts the record's fact before.

    Args:
        record: A TinyFacts edit record (with ``subject``).
        mode: ``"subject"`` (in-scope questions whose text names the subject) or ``"in_scope"``
            (every in-scope question).

    Returns:
        The question texts.
    """
    questions = {record.prompt, *record.rephrase_prompts}
    for group in record.portability.values():
        for pair in group:
            if mode == "in_scope" or (record.subject and record.subject in pair.prompt):
                questions.add(pair.prompt)
    return questions


class OracleRetriever:
    """A stand-in for :class:`~lit_edit.nn.retrieval.Retriever` that retrieves by the labels.

    Args:
        memory: The editor's memory (edits are stored in it as usual, with dummy keys).
        records: The evaluated records, found by their edit question.
        mode: See :func:`admitted`.
    """

    def __init__(self, memory: EditMemory, records: Sequence[EditRecord], mode: str) -> None:
        self.memory = memory
        self.scopes = {r.prompt: admitted(r, mode) for r in records}

    def insert(self, questions: Sequence[str], facts: Sequence[str]) -> int:
        """Store the edits (keys are unused zeros); returns the size before."""
        size = len(self.memory)
        if questions:
            self.memory.add(torch.zeros(len(questions), 1), questions, facts)
        return size

    def retrieve(self, queries: Sequence[str], k: int | None = None) -> list[list[Retrieved]]:
        """The most recent edit whose oracle scope holds each query (or none)."""
        out = []
        for query in queries:
            hits = [
                Retrieved(i, self.memory.facts[i], 1.0)
                for i in reversed(range(len(self.memory)))
                if query in self.scopes[self.memory.questions[i]]
            ]
            out.append(hits[:1])
        return out


class OracleScope(Callback):
    """Replace the LTE editor's retriever by an :class:`OracleRetriever` for ``test``.

    Args:
        mode: See :func:`admitted`.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Install the oracle over the test records."""
        records = trainer.datamodule.edits.records["test"]
        pl_module._retriever = OracleRetriever(pl_module.memory, records, self.mode)


def evaluate(ckpt: str, n: int, mode: str, out: Path) -> dict[str, float]:
    """One single-edit evaluation through ``evaluate.py``'s entry point.

    Args:
        ckpt: The LTE checkpoint.
        n: Held-out records.
        mode: ``"cosine"`` (threshold 0.8), ``"scope"`` (the shipped retriever) or an oracle
            mode of :func:`admitted`.
        out: Folder for the run's logs and results.

    Returns:
        The run's ``summary.json`` metrics with its per-group ``breakdown`` merged in.
    """
    from lit_edit.cli import evaluate_main

    args = ["--config", _CONFIG, "--ckpt_path", ckpt,
            "--data.init_args.edits.init_args.n_test", str(n),
            "--trainer.logger.init_args.save_dir", str(out / mode),
            "--trainer.enable_progress_bar", "false"]
    if mode == "cosine":
        args += ["--config", "configs/lte/eval_threshold.yaml"]
    elif mode != "scope":
        overlay = out / f"{mode}.yaml"
        overlay.write_text(
            "trainer:\n  callbacks:\n"
            f"    - class_path: {__name__}.OracleScope\n      init_args: {{mode: {mode}}}\n"
        )
        args += ["--config", str(overlay)]
    evaluate_main(args)
    summary = json.loads(next((out / mode).rglob("summary.json")).read_text())
    return {**summary, **summary["breakdown"]}


def alias_recall(ckpt: str | None, n: int) -> tuple[int, int]:
    """How often the model completes ``"<subject> is also known as"`` with the alias (greedy).

    Args:
        ckpt: An LTE checkpoint (``None``: the TinyFacts base model).
        n: Held-out records whose person subjects are asked.

    Returns:
        ``(correct, asked)``.
    """
    from lit_edit.data import TinyFactsDataModule
    from lit_edit.data.tinyfacts import load_tinyfacts_world
    from lit_edit.methods import LTEEditor

    data = TinyFactsDataModule(world="tinyfacts", n_test=n)
    data.setup("test")
    world = load_tinyfacts_world("tinyfacts")
    subjects = [r.subject for r in data.records["test"] if "subject_aliasing" in r.portability]
    editor = (LTEEditor(backbone="tinyfacts") if ckpt is None
              else LTEEditor.load_from_checkpoint(ckpt, map_location="cpu"))
    editor.eval()
    gens = editor.evaluation.scorer().generate(
        editor.model, editor.tokenizer, [f"{s} is also known as" for s in subjects], 8
    )
    correct = sum(
        g.text.split()[:1] == [world.alias(s)] for g, s in zip(gens, subjects, strict=True)
    )
    return correct, len(subjects)


def scope_acceptance(ckpt: str, n: int) -> dict[str, tuple[float, int]]:
    """Share of (edit question, question) pairs the checkpoint's scope head puts in scope.

    Args:
        ckpt: An LTE checkpoint with a trained scope head.
        n: Held-out records (those with alias questions are used).

    Returns:
        Per question kind, ``(accepted share, pairs)``.
    """
    import random

    from lit_edit.data import TinyFactsDataModule
    from lit_edit.methods import LTEEditor

    editor = LTEEditor.load_from_checkpoint(ckpt, map_location="cpu")
    editor.eval()
    data = TinyFactsDataModule(world="tinyfacts", n_test=n)
    data.setup("test")
    records = [r for r in data.records["test"] if "subject_aliasing" in r.portability]
    rng = random.Random(0)
    kinds: dict[str, list[tuple[str, str]]] = {}
    for r in records:
        same_relation = [o for o in records if o.meta["relation"] == r.meta["relation"]]
        other = rng.choice([o for o in same_relation if o.subject != r.subject])
        for kind, pairs in (
            ("own alias", r.portability["subject_aliasing"]),
            ("other subject's alias, same relation", other.portability["subject_aliasing"]),
            ("neighbourhood (locality)", r.locality.get("neighborhood", ())),
            ("other relation (locality)", r.locality.get("other_relation", ())),
        ):
            kinds.setdefault(kind, []).extend((r.prompt, p.prompt) for p in pairs)
    out = {}
    for kind, pairs in kinds.items():
        edits, queries = [e for e, _ in pairs], [q for _, q in pairs]
        states = None
        if editor.scope_layer is not None:
            states = (editor.question_states(edits), editor.question_states(queries))
        prob = editor.scope_head(editor.retriever.embed(edits), editor.retriever.embed(queries),
                                 states)
        out[kind] = (float((prob >= editor.scope_threshold).float().mean()), len(pairs))
    return out


def main() -> None:
    """Print the portability and locality under each scope rule, and the models' alias recall."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="checkpoints/lte/tinyfacts/lte.ckpt", help="LTE ckpt")
    parser.add_argument("--n", type=int, default=200, help="held-out records")
    args = parser.parse_args()
    from lit_edit.environment import environment_line

    print(environment_line(), flush=True)
    if not Path(args.ckpt).is_file():
        raise SystemExit(f"{args.ckpt} not found: python train.py fit --config {_CONFIG}")

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, mode in (("cosine 0.8", "cosine"), ("learned scope", "scope"),
                           ("names subject", "subject"), ("in scope", "in_scope")):
            rows[name] = evaluate(args.ckpt, args.n, mode, Path(tmp))
    alias = {name: alias_recall(ckpt, args.n) for name, ckpt in
             (("base model", None), ("aligned model", args.ckpt))}

    columns = {"edit succ.": "reliability", "general.": "generalization",
               "portability": "portability", "two-hop": "portability/two_hop",
               "alias": "portability/subject_aliasing", "locality": "locality"}
    print(f"single edit, {args.n} held-out records, {args.ckpt} (x100)")
    print(f"  {'scope':<16}" + "".join(f"{k:>12}" for k in columns))
    for name, metrics in rows.items():
        cells = "".join(f"{100 * metrics[k]:12.2f}" for k in columns.values())
        print(f"  {name:<16}{cells}")
    for name, (correct, asked) in alias.items():
        print(f"alias recall, {name}: {correct}/{asked} = {100 * correct / asked:.1f} %")
    if rows["learned scope"]["hyper_parameters"].get("scope"):
        print("questions the scope head puts in the scope of an edit (same records)")
        for kind, (share, pairs) in scope_acceptance(args.ckpt, args.n).items():
            print(f"  {kind:<40} {100 * share:5.1f} %  ({pairs} pairs)")


if __name__ == "__main__":
    main()
