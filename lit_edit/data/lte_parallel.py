"""LTE-style parallel alignment data built from any edit dataset (METHODS.md §5.1).

For each edit record the builder makes:

* **in-scope** samples: the edit prompt, each rephrase prompt and each portability question, asked
  under the template with the facts (:data:`~lit_edit.nn.lte_templates.LTE_TEMPLATE`) and answered
  with the new fact (``target_new``, or the portability answer);
* **out-of-scope** samples: each locality question under the same kind of fact list, answered as
  without the edit (its dataset answer);
* **unedited twins**: the same questions without any fact (the bare question as the human turn),
  answered as the unedited model would: ``ground_truth`` for the edit and rephrase prompts, the
  locality answer for locality questions, and, for portability questions (whose unedited answer
  datasets rarely give), the answer of ``unedited_answers`` when one is given (otherwise no twin).

The fact list holds the true fact alone (50%), with one distractor (25%) or with two (25%);
distractors are drawn (seeded) from the ``n_neighbours`` nearest other facts by embedding
(cosine), never about the same subject nor the same sentence; the true fact is first (unless
``true_fact_first=False`` places it at random) and several facts are numbered ``1. ...`` /
``2. ...`` on separate lines, as in the paper's data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch.nn.functional as F

from lit_edit.nn.lte_templates import LTE_TEMPLATE, edit_prompt
from lit_edit.nn.retrieval import Encoder
from lit_edit.records import EditRecord

Scope = Literal["in", "out"]


@dataclass(frozen=True)
class ParallelSample:
    """One alignment sample: a human turn and the answer trained on.

    Attributes:
        human: The human turn: the template with facts, or the bare question.
        answer: The assistant turn (the only trained tokens, with the EOS after it).
        scope: ``"in"`` (the fact applies) or ``"out"`` (it must not change the answer).
        facts: The facts in the template, the record's own fact first unless the builder places it
            at random (empty for an unedited twin).
        question: The bare question.
        kind: ``"edit"``, ``"rephrase"``, ``"portability/<key>"`` or ``"locality/<key>"``.
        record: Index of the source record in the builder's input.
    """

    human: str
    answer: str
    scope: Scope
    facts: tuple[str, ...]
    question: str
    kind: str
    record: int

    @property
    def with_facts(self) -> bool:
        """Whether the human turn carries facts (an edited sample)."""
        return bool(self.facts)

    def to_conversation(self, conv_id: str) -> dict[str, Any]:
        """The sample as a FastChat conversation (the LTE training-file format)."""
        return {
            "id": conv_id,
            "conversations": [
                {"from": "human", "value": self.human},
                {"from": "gpt", "value": self.answer},
            ],
        }


def nearest_other_facts(
    records: Sequence[EditRecord], encoder: Encoder, n_neighbours: int = 5, chunk: int = 1024
) -> list[list[int]]:
    """For each record, the ``n_neighbours`` most similar other records' facts (cosine).

    Records about the same subject and records whose fact is the same sentence are never
    neighbours.

    Args:
        records: Edit records (their :attr:`~lit_edit.records.EditRecord.fact` is embedded).
        encoder: Sentence encoder.
        n_neighbours: Neighbours kept per record.
        chunk: Rows of the similarity matrix computed at a time.

    Returns:
        Per record, indices of its neighbours, most similar first (fewer if not enough qualify).
    """
    facts = [r.fact for r in records]
    if not facts:
        return []
    emb = F.normalize(encoder.encode(facts).float(), dim=-1)  # [N, D]
    n = len(facts)
    out: list[list[int]] = []
    for start in range(0, n, chunk):
        sims = emb[start : start + chunk] @ emb.T  # [C, N]
        width = min(n, n_neighbours + 32)
        top = sims.topk(width, dim=-1).indices.tolist()
        for row, cand in enumerate(top):
            i = start + row
            picked = _qualifying(records, facts, i, cand, n_neighbours)
            if len(picked) < n_neighbours and width < n:  # many same-subject facts: full order
                order = sims[row].argsort(descending=True).tolist()
                picked = _qualifying(records, facts, i, order, n_neighbours)
            out.append(picked)
    return out


def _qualifying(
    records: Sequence[EditRecord], facts: Sequence[str], i: int, cand: Sequence[int], k: int
) -> list[int]:
    subject = records[i].subject
    picked: list[int] = []
    for j in cand:
        if j == i or facts[j] == facts[i]:
            continue
        if subject is not None and records[j].subject == subject:
            continue
        picked.append(j)
        if len(picked) == k:
            break
    return picked


class ParallelDataBuilder:
    """Builds LTE-style parallel samples from edit records (see the module docstring).

    Args:
        encoder: Sentence encoder for the nearest-neighbour distractors (``None``: distractors
            drawn uniformly from other subjects' facts).
        fact_counts: Probabilities of 1, 2 and 3 facts in a list (the paper: 0.5, 0.25, 0.25).
        n_neighbours: Nearest facts a distractor is drawn from (the paper: 5).
        seed: Seed of every random choice.
        template: Template with ``{facts}`` and ``{question}`` (the paper's by default).
        max_in_scope: Most in-scope questions per record (``None``: all); picked in order edit,
            rephrases, portability after a seeded shuffle of the non-edit ones.
        max_out_of_scope: Most locality questions per record (``None``: all).
        out_of_scope_groups: Locality groups the out-of-scope questions come from (``None``:
            all), e.g. ``["other_relation"]`` for questions about the edited subject only.
        unedited_twins: Also make the samples without facts.
        unedited_answers: Answers of the unedited model to bare questions (a function from
            questions to answers), used for the portability twins; ``None``: no portability twin.
        true_fact_first: Put the record's fact first in every list (the paper). ``False`` puts
            it at a seeded random place, so that the answer must be found by matching the
            question's subject rather than by copying the first fact.
    """

    def __init__(
        self,
        encoder: Encoder | None = None,
        fact_counts: Sequence[float] = (0.5, 0.25, 0.25),
        n_neighbours: int = 5,
        seed: int = 0,
        template: str = LTE_TEMPLATE,
        max_in_scope: int | None = None,
        max_out_of_scope: int | None = None,
        out_of_scope_groups: Sequence[str] | None = None,
        unedited_twins: bool = True,
        unedited_answers: Callable[[list[str]], list[str]] | None = None,
        true_fact_first: bool = True,
    ) -> None:
        if len(fact_counts) != 3 or any(p < 0 for p in fact_counts) or sum(fact_counts) <= 0:
            raise ValueError(
                f"fact_counts must be 3 non-negative probabilities (1, 2, 3 facts), got "
                f"{list(fact_counts)}"
            )
        if "{facts}" not in template or "{question}" not in template:
            raise ValueError("template must contain {facts} and {question}")
        total = float(sum(fact_counts))
        self.fact_counts = tuple(p / total for p in fact_counts)
        self.encoder = encoder
        self.n_neighbours = n_neighbours
        self.seed = seed
        self.template = template
        self.max_in_scope = max_in_scope
        self.max_out_of_scope = max_out_of_scope
        self.out_of_scope_groups = None if out_of_scope_groups is None else set(out_of_scope_groups)
        self.unedited_twins = unedited_twins
        self.unedited_answers = unedited_answers
        self.true_fact_first = true_fact_first

    def distractor_pools(self, records: Sequence[EditRecord]) -> list[list[int]]:
        """Per record, the indices of the records whose facts may be its distractors."""
        if self.encoder is not None:
            return nearest_other_facts(records, self.encoder, self.n_neighbours)
        rng = random.Random(self.seed)
        pools = []
        for i, r in enumerate(records):
            others = [
                j
                for j in rng.sample(range(len(records)), min(len(records), 4 * self.n_neighbours))
                if j != i and (r.subject is None or records[j].subject != r.subject)
                and records[j].fact != r.fact
            ]
            pools.append(others[: self.n_neighbours])
        return pools

    def _facts(
        self, rng: random.Random, records: Sequence[EditRecord], i: int, pool: list[int]
    ) -> tuple[str, ...]:
        u = rng.random()
        p1, p2, _ = self.fact_counts
        n_extra = 0 if u < p1 else 1 if u < p1 + p2 else 2
        chosen = rng.sample(pool, min(n_extra, len(pool)))
        facts = [records[i].fact, *(records[j].fact for j in chosen)]
        if not self.true_fact_first:
            rng.shuffle(facts)
        return tuple(facts)

    def build(self, records: Sequence[EditRecord]) -> list[ParallelSample]:
        """Make the parallel samples of ``records``, in record order.

        Args:
            records: Edit records from any reader.

        Returns:
            For each record its edited in-scope samples, edited out-of-scope samples and their
            unedited twins.
        """
        pools = self.distractor_pools(records)
        rng = random.Random(self.seed)
        samples: list[ParallelSample] = []
        pending_portability: list[tuple[int, str, str]] = []  # (record, kind, question)
        for i, r in enumerate(records):
            in_scope = [(q, r.target_new, "rephrase") for q in r.rephrase_prompts]
            for key, pairs in r.portability.items():
                in_scope += [(p.prompt, p.answer, f"portability/{key}") for p in pairs]
            rng.shuffle(in_scope)
            in_scope.insert(0, (r.prompt, r.target_new, "edit"))
            if self.max_in_scope is not None:
                in_scope = in_scope[: self.max_in_scope]
            out_scope = [
                (p.prompt, p.answer, f"locality/{key}")
                for key, pairs in r.locality.items()
                if self.out_of_scope_groups is None or key in self.out_of_scope_groups
                for p in pairs
            ]
            if self.max_out_of_scope is not None:
                rng.shuffle(out_scope)
                out_scope = out_scope[: self.max_out_of_scope]
            for scope, questions in (("in", in_scope), ("out", out_scope)):
                for question, answer, kind in questions:
                    facts = self._facts(rng, records, i, pools[i])
                    human = edit_prompt(facts, question, self.template)
                    samples.append(ParallelSample(human, answer, scope, facts, question, kind, i))
                    if not self.unedited_twins:
                        continue
                    if scope == "out":
                        bare = answer
                    elif kind.startswith("portability/"):
                        pending_portability.append((i, kind, question))
                        continue
                    elif r.ground_truth:
                        bare = r.ground_truth[0]
                    else:
                        continue
                    samples.append(ParallelSample(question, bare, scope, (), question, kind, i))
        if pending_portability and self.unedited_answers is not None:
            answers = self.unedited_answers([q for _, _, q in pending_portability])
            for (i, kind, question), answer in zip(pending_portability, answers, strict=True):
                if answer.strip():
                    samples.append(ParallelSample(question, answer, "in", (), question, kind, i))
        return samples


def to_fastchat(
    samples: Sequence[ParallelSample], source: str = "lit_edit"
) -> list[dict[str, Any]]:
    """The samples as a FastChat list, ids ``identity_{i}_{source}`` (LTE_train_data.json style)."""
    return [s.to_conversation(f"identity_{i}_{source}") for i, s in enumerate(samples)]


def write_fastchat(
    samples: Sequence[ParallelSample], path: str | Path, source: str = "lit_edit"
) -> None:
    """Write the samples as a FastChat JSON file readable by ``read_conversations``."""
    Path(path).write_text(
        json.dumps(to_fastchat(samples, source), ensure_ascii=False, indent=1), encoding="utf-8"
    )


def sample_stats(samples: Sequence[ParallelSample]) -> dict[str, int]:
    """Counts of samples by scope and by presence of facts (for logs)."""
    counts = {"in/edited": 0, "in/unedited": 0, "out/edited": 0, "out/unedited": 0}
    for s in samples:
        counts[f"{s.scope}/{'edited' if s.with_facts else 'unedited'}"] += 1
    counts["facts=1"] = sum(1 for s in samples if len(s.facts) == 1)
    counts["facts=2"] = sum(1 for s in samples if len(s.facts) == 2)
    counts["facts=3"] = sum(1 for s in samples if len(s.facts) == 3)
    return counts

