"""Evaluation settings and per-record measurement.

Which pairs a record is scored on, and the metric values derived from its pre- and post-edit
scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from lit_edit.editor import Editor, ParallelEdits
from lit_edit.metrics.accuracy import record_agreement, record_exact_match, record_token_accuracy
from lit_edit.metrics.counterfact import CounterFactRecordScores, contrast
from lit_edit.metrics.fluency import ngram_entropy
from lit_edit.protocols import EditingProtocol, SingleEdit
from lit_edit.record_measure import RecordMeasure
from lit_edit.records import EditRecord, QAPair
from lit_edit.scoring import GeneratedAnswer, PairScore, Scorer


class Evaluation:
    """How an editor is evaluated (the ``evaluation:`` section of a config).

    Args:
        protocol: The editing protocol: ``lit_edit.protocols.SingleEdit`` (default),
            ``BatchEdit`` or ``SequentialEdit`` (T-group editing, explicit evaluation timing).
        batch_size: Pairs per forward of the batched scorer.
        padding_side: Padding side of the scorer's batches (``"left"``, the field's convention,
            or ``"right"``); it never changes a value.
        max_length: Truncate longer scored sequences from the left of the prompt (``None``:
            never).
        exact_match: Also compute generation-based exact match (greedy) beside the
            teacher-forced token accuracies (``*_em`` metrics).
        fluency: Generate from each edit prompt after editing (seeded top-k sampling) and report
            the weighted 2/3-gram entropy (bits; KnowEdit tables show it x100).
        fluency_max_length: Total length of the fluency generations, in tokens.
        counterfact: Report ROME's CounterFact scores (ES/EM, PS/PM, NS/NM and S) from the
            records' ``ground_truth`` and ``locality["neighborhood"]``.
        perplexity: Report the perplexity of ``target_new`` given the prompt (WISE
            hallucination).
        aggregation: How a record's portability/locality groups combine: ``"keys"`` (mean of
            the groups' means, EasyEdit's KnowEdit tables) or ``"pairs"`` (mean over pairs).
        verify_restore: Keep a copy of the editor's weights and check after every group that
            restoring left every tensor bit-identical (fails loudly otherwise).
        locality_conflicts: ``"keep"`` (every locality pair is scored, EasyEdit's way) or
            ``"exclude"``: leave out of a record's locality the pairs that ask about a fact
            another edit in effect changed (:mod:`lit_edit.conflicts`), whose answer should
            change; each row counts them (``locality_excluded``), ``summary.json`` sums them.
        results_dir: Folder for the results (default: ``<log_dir>/results``).
        seed: Seed of the fluency sampling.
    """

    def __init__(
        self,
        protocol: EditingProtocol | None = None,
        batch_size: int = 64,
        padding_side: Literal["left", "right"] = "left",
        max_length: int | None = None,
        exact_match: bool = True,
        fluency: bool = False,
        fluency_max_length: int = 100,
        counterfact: bool = False,
        perplexity: bool = False,
        aggregation: Literal["keys", "pairs"] = "keys",
        verify_restore: bool = False,
        locality_conflicts: Literal["keep", "exclude"] = "keep",
        results_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        if locality_conflicts not in ("keep", "exclude"):
            raise ValueError(
                f"locality_conflicts must be 'keep' or 'exclude', got {locality_conflicts!r}"
            )
        self.protocol = protocol if protocol is not None else SingleEdit()
        self.batch_size = batch_size
        self.padding_side = padding_side
        self.max_length = max_length
        self.exact_match = exact_match
        self.fluency = fluency
        self.fluency_max_length = fluency_max_length
        self.counterfact = counterfact
        self.perplexity = perplexity
        self.aggregation = aggregation
        self.verify_restore = verify_restore
        self.locality_conflicts = locality_conflicts
        self.results_dir = results_dir
        self.seed = seed
        self._scorer = Scorer(batch_size, padding_side, max_length)

    def scorer(self) -> Scorer:
        """The batched scorer these settings describe."""
        return self._scorer

    def describe(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (for ``summary.json``)."""
        out = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "protocol"}
        out["protocol"] = self.protocol.describe()
        return out


class RecordEvaluator:
    """Measures records under an editor's current state with one batched scoring call.

    Args:
        settings: The evaluation settings.
    """

    def __init__(self, settings: Evaluation) -> None:
        self.settings = settings

    def measure(
        self,
        editor: Editor | ParallelEdits,
        records: Sequence[EditRecord],
        parallel: bool = False,
    ) -> list[RecordMeasure]:
        """Score every pair of every record (and generate, if configured) in batched calls.

        Args:
            editor: The editor, in the state to measure; with ``parallel``, the view of the
                records' independent edits (:class:`~lit_edit.editor.ParallelEdits`), record
                ``k`` measured under edit ``k``.
            records: The records.
            parallel: Measure each record under its own edit of a parallel view.

        Returns:
            One measure per record, in order.
        """
        pairs: list[QAPair] = []
        owners: list[int] = []

        def add(pair: QAPair) -> int:
            """Queue a pair for scoring; return its index among the queued pairs."""
            pairs.append(pair)
            owners.append(k)
            return len(pairs) - 1

        plans = []
        for k, r in enumerate(records):
            plan: dict[str, Any] = {
                "edit": add(r.edit_pair),
                "rephrase": [add(p) for p in r.rephrase_pairs],
                "portability": {k: [add(p) for p in v] for k, v in r.portability.items()},
                "locality": {k: [add(p) for p in v] for k, v in r.locality.items()},
            }
            if self.settings.counterfact and r.ground_truth:
                true = r.ground_truth[0]
                plan["cf_true"] = add(QAPair(r.prompt, true))
                plan["cf_rephrase_true"] = [add(QAPair(p, true)) for p in r.rephrase_prompts]
                plan["cf_neighborhood_new"] = [
                    add(QAPair(p.prompt, r.target_new)) for p in r.locality.get("neighborhood", ())
                ]
            plans.append(plan)
        scores = editor.score_pairs(pairs, owners) if parallel else editor.score_pairs(pairs)
        measures = [self._assemble(r, plan, scores) for r, plan in zip(records, plans, strict=True)]
        record_values = getattr(editor, "record_values", None)  # optional for duck-typed editors
        if record_values is not None:
            for m, extra in zip(measures, record_values(records), strict=True):
                m.extra = dict(extra)
        if self.settings.exact_match:
            self._add_answers(editor, records, measures, parallel)
        if self.settings.fluency:
            prompts = [r.prompt for r in records]
            length, seed = self.settings.fluency_max_length, self.settings.seed
            texts = (
                editor.sample(prompts, length, seed, list(range(len(records)))) if parallel
                else editor.sample(prompts, length, seed)
            )
            for m, gen in zip(measures, texts, strict=True):
                m.fluency_text = gen.full_text
        return measures

    @staticmethod
    def _assemble(
        record: EditRecord, plan: dict[str, Any], scores: list[PairScore]
    ) -> RecordMeasure:
        """Pick a record's scores out of the flat list."""
        m = RecordMeasure(
            edit=scores[plan["edit"]],
            rephrase=[scores[i] for i in plan["rephrase"]],
            rephrase_kinds=record.rephrase_kinds,
            portability={k: [scores[i] for i in v] for k, v in plan["portability"].items()},
            locality={k: [scores[i] for i in v] for k, v in plan["locality"].items()},
        )
        if "cf_true" in plan:
            m.counterfact = CounterFactRecordScores(
                rewrite=[(m.edit, scores[plan["cf_true"]])],
                paraphrase=[
                    (new, scores[i])
                    for new, i in zip(m.rephrase, plan["cf_rephrase_true"], strict=True)
                ],
                neighborhood=[
                    (scores[i], true)
                    for i, true in zip(
                        plan["cf_neighborhood_new"], m.locality.get("neighborhood", []), strict=True
                    )
                ],
            )
        return m

    @staticmethod
    def _add_answers(
        editor: Editor | ParallelEdits,
        records: Sequence[EditRecord],
        measures: list[RecordMeasure],
        parallel: bool = False,
    ) -> None:
        """Greedy answers of the edit, rephrase and portability pairs, in one batched call."""
        pairs: list[QAPair] = []
        spans = []
        for r in records:
            start = len(pairs)
            pairs.append(r.edit_pair)
            pairs.extend(r.rephrase_pairs)
            for group in r.portability.values():
                pairs.extend(group)
            spans.append(start)
        owners = [k for k, start in enumerate(spans)
                  for _ in range(start, spans[k + 1] if k + 1 < len(spans) else len(pairs))]
        answers: list[GeneratedAnswer] = (
            editor.generate_answers(pairs, owners) if parallel else editor.generate_answers(pairs)
        )
        for r, m, start in zip(records, measures, spans, strict=True):
            i = start
            m.answers["reliability"] = [answers[i]]
            i += 1
            m.answers["generalization"] = answers[i : i + len(r.rephrase_prompts)]
            i += len(r.rephrase_prompts)
            grouped = {}
            for key, group in r.portability.items():
                grouped[key] = answers[i : i + len(group)]
                i += len(group)
            m.answers["portability"] = grouped

    def values(
        self, pre: RecordMeasure, post: RecordMeasure, is_pre: bool = False
    ) -> dict[str, float | None]:
        """Metric values of one record (``None`` where the record has nothing to score).

        Args:
            pre: The record's pre-edit measure.
            post: Its measure in the state being described (``pre`` itself for pre-edit values).
            is_pre: Describe the pre-edit state (locality, an agreement with itself, is left out).

        Returns:
            ``reliability``, ``generalization``, ``portability``, ``locality``, their per-group
            breakdowns (``generalization/<kind>`` when the record names its rephrase kinds,
            ``portability/<key>``, ``locality/<key>``) and the optional metrics.
        """
        agg = self.settings.aggregation
        out: dict[str, float | None] = {
            "reliability": record_token_accuracy([post.edit], agg),
            "generalization": record_token_accuracy(post.rephrase, agg),
            "portability": record_token_accuracy(post.portability, agg),
            "locality": None,
        }
        kinds = post.rephrase_kinds
        scored = list(zip(post.rephrase, kinds, strict=True)) if kinds else []
        for kind in dict.fromkeys(kinds):
            group = [score for score, k in scored if k == kind]
            out[f"generalization/{kind}"] = record_token_accuracy(group, agg)
        for key, group in post.portability.items():
            out[f"portability/{key}"] = record_token_accuracy(group, agg)
        if not is_pre:
            out.update(self.locality_values(pre, post))
        for kind, answers in post.answers.items():
            out[f"{kind}_em"] = record_exact_match(answers, agg)
        if post.fluency_text is not None:
            out["fluency"] = ngram_entropy(post.fluency_text)
        if self.settings.perplexity:
            out["perplexity"] = math.exp(post.edit.nll)
        if post.counterfact is not None:
            for kind, short in (("rewrite", "E"), ("paraphrase", "P"), ("neighborhood", "N")):
                pairs = getattr(post.counterfact, kind)
                values = [contrast(n.nll, t.nll, kind == "neighborhood") for n, t in pairs]
                out[f"{short}S"] = sum(v[0] for v in values) / len(values) if values else None
                out[f"{short}M"] = sum(v[1] for v in values) / len(values) if values else None
        out.update(post.extra)
        return out

    def locality_values(self, pre: RecordMeasure, post: RecordMeasure) -> dict[str, float | None]:
        """A record's ``locality`` and ``locality/<key>`` agreements of post with pre scores."""
        agg = self.settings.aggregation
        out = {"locality": record_agreement(pre.locality, post.locality, agg)}
        for key, group in post.locality.items():
            out[f"locality/{key}"] = record_agreement(pre.locality[key], group, agg)
        return out
