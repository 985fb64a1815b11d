"""Locality pairs that another applied edit changed: detection and exclusion."""

import pytest
import torch

from lit_edit.conflicts import first_conflicts
from lit_edit.editing import CallbackHandle
from lit_edit.evaluation import Evaluation
from lit_edit.evaluation_run import EvaluationRun
from lit_edit.protocols import BatchEdit, SequentialEdit, SingleEdit
from lit_edit.records import EditRecord, QAPair
from lit_edit.scoring import PairScore


def _records() -> list[EditRecord]:
    ann_born = EditRecord(
        "Ann was born in", "Paris", ground_truth=("Rome",), subject="Ann",
        locality={"other_relation": (QAPair("Ann lives in", "Oslo"),
                                     QAPair("Where does Ann work?", "Zed"))},
    )
    ann_lives = EditRecord(
        "Ann lives in", "Lima", ground_truth=("Oslo",), subject="Ann",
        rephrase_prompts=("Where does Ann live?",),
        locality={"neighborhood": (QAPair("Q: Cy works for?", "Acme"),)},
    )
    cy_works = EditRecord(
        "Cy works for", "Bolt", ground_truth=("Acme",), subject="Cy",
        locality={"other_relation": (QAPair("The birthplace of Ann is", "Rome"),
                                     QAPair("Where does Ann live?", "Oslo"),
                                     QAPair("Bo works for", "Acme"))},
    )
    return [ann_born, ann_lives, cy_works]


def test_first_conflicts_by_hand():
    assert first_conflicts(_records()) == [
        {"other_relation": [1, None]},  # B edits Ann's residence (subject + old answer)
        {"neighborhood": [2]},  # C's subject named, C's old object asked
        {"other_relation": [0, 1, None]},  # A's fact; B's rephrase verbatim; Bo is not edited
    ]
    assert first_conflicts(_records()[:1]) == [{"other_relation": [None, None]}]


class _FactEditor:
    """Answers a question with a changed token exactly when an applied edit's question is asked."""

    def __init__(self) -> None:
        self.edited: list[EditRecord] = []

    def edit(self, records):
        size = len(self.edited)
        self.edited.extend(records)
        return CallbackHandle(lambda: self.edited.__delitem__(slice(size, None)))

    def score_pairs(self, pairs):
        changed = {q for r in self.edited for q in (r.prompt, *r.rephrase_prompts)}
        changed |= {f"Q: {r.prompt}?" for r in self.edited}  # other wordings of the same facts
        changed |= {f"The birthplace of {r.subject} is" for r in self.edited if "born" in r.prompt}
        return [
            PairScore(torch.tensor([7]), torch.tensor([8 if p.prompt in changed else 7]),
                      torch.tensor([0.0]))
            for p in pairs
        ]


def _run(protocol, mode):
    run = EvaluationRun(Evaluation(protocol=protocol, exact_match=False, locality_conflicts=mode))
    run.add(_FactEditor(), _records())
    run.flush(_FactEditor())
    return run


@pytest.mark.parametrize(
    ("protocol", "excluded", "locality"),
    [
        (BatchEdit(batch_size=3), [1, 1, 2], [1.0, None, 1.0]),  # B has no pair left
        (SequentialEdit(3, "after_each"), [0, 0, 2], [1.0, 1.0, 1.0]),  # only earlier edits
        (SingleEdit(), [0, 0, 0], [1.0, 1.0, 1.0]),
    ],
)
def test_exclusion_follows_the_edits_in_effect(protocol, excluded, locality):
    kept = _run(protocol, "exclude")
    assert [r.post["locality_excluded"] for r in kept.results] == excluded
    assert [r.post["locality"] for r in kept.results] == locality
    rows = kept.rows()
    assert kept.summary(_Named(), rows)["counts"]["locality"]["pairs_excluded"] == sum(excluded)
    scored = [v for v in locality if v is not None]
    assert float(kept.metrics["locality"].compute()) == pytest.approx(sum(scored) / len(scored))


def test_keep_scores_every_pair_as_easyedit_does():
    every = _run(BatchEdit(batch_size=3), "keep")
    assert [r.post["locality"] for r in every.results] == [0.5, 0.0, pytest.approx(1 / 3)]
    assert all("locality_excluded" not in r.post for r in every.results)
    with pytest.raises(ValueError, match="locality_conflicts"):
        Evaluation(locality_conflicts="drop")


class _Named:
    """Stands in for an editor in ``summary`` (its class name and hyper-parameters)."""

    hparams: dict = {}
