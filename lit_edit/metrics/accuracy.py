"""Teacher-forced token accuracy, locality agreement and generation-based exact match.

All three average a per-pair value per record, then over records
(:mod:`lit_edit.metrics.aggregation`); values are fractions in ``[0, 1]`` (KnowEdit/LTE tables
multiply by 100).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lit_edit.metrics.aggregation import (
    Groups,
    RecordMeanMetric,
    as_groups,
    map_groups,
    record_mean,
)
from lit_edit.scoring import GeneratedAnswer, PairScore


def token_accuracy(
    pred_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Fraction of label tokens predicted by the argmax (EasyEdit's ``*_acc``, METHODS.md §6.1).

    ``acc = sum_t 1[pred_t = y_t] m_t / sum_t m_t`` with ``m_t = 1[y_t != ignore_index]``.

    Args:
        pred_ids: ``[..., T]`` argmax tokens aligned with the labels.
        labels: ``[..., T]`` label tokens, ``ignore_index`` where not scored.
        ignore_index: Label value of unscored positions.

    Returns:
        ``[...]`` float accuracy per sequence (NaN for a sequence without any label).
    """
    if pred_ids.shape != labels.shape:
        raise ValueError(f"shape mismatch: {tuple(pred_ids.shape)} vs {tuple(labels.shape)}")
    valid = labels != ignore_index
    hits = ((pred_ids == labels) & valid).sum(-1).float()
    return hits / valid.sum(-1).float()


def pair_accuracy(score: PairScore, strict: bool = False) -> float:
    """A pair's token accuracy, or (``strict``) 1.0 iff every answer token is the argmax."""
    return float(score.exact) if strict else score.token_accuracy


def pair_agreement(pre: PairScore, post: PairScore) -> float:
    """Locality agreement of one pair: ``mean_t 1[pred_pre_t = pred_post_t]``.

    Raises:
        ValueError: if the two scores are not of the same answer tokens.
    """
    if not torch.equal(pre.answer_ids, post.answer_ids):
        raise ValueError(
            "pre- and post-edit scores have different answer tokens "
            f"({pre.answer_ids.tolist()} vs {post.answer_ids.tolist()}); pair them in order"
        )
    return float((pre.pred_ids == post.pred_ids).float().mean())


def answer_matches(answer: GeneratedAnswer, ignore_case: bool = False) -> bool:
    """Generation exact match of one pair.

    True iff for some candidate ``c`` (the answer or an alias) the greedy continuation cut to
    ``c``'s token length, stripped of surrounding whitespace, equals ``c`` stripped (compared
    after ``str.casefold`` when ``ignore_case``). A continuation that equals a shorter alias
    therefore counts (the comparison of the first ``len(c)`` tokens, as in EasyEdit's
    ``vanilla_generation``).
    """

    def norm(text: str) -> str:
        """Strip, and casefold when case is ignored."""
        text = text.strip()
        return text.casefold() if ignore_case else text

    return any(
        norm(cont) == norm(cand)
        for cand, cont in zip(answer.candidates, answer.continuations, strict=True)
    )


def record_token_accuracy(
    record: Groups[PairScore], aggregation: str = "keys", strict: bool = False
) -> float | None:
    """One record's token accuracy (``None`` without pairs); see :class:`TokenAccuracy`."""
    return record_mean(map_groups(lambda s: pair_accuracy(s, strict), record), aggregation)


def record_agreement(
    pre: Groups[PairScore], post: Groups[PairScore], aggregation: str = "keys"
) -> float | None:
    """One record's locality agreement (``None`` without pairs); see :class:`LocalityAgreement`."""
    return record_mean(_agreements(pre, post), aggregation)


def record_exact_match(
    record: Groups[GeneratedAnswer], aggregation: str = "keys", ignore_case: bool = False
) -> float | None:
    """One record's exact-match rate (``None`` without pairs); see :class:`ExactMatch`."""
    return record_mean(
        map_groups(lambda a: float(answer_matches(a, ignore_case)), record), aggregation
    )


def _agreements(pre: Groups[PairScore], post: Groups[PairScore]) -> dict[str, list[float]]:
    pre_g, post_g = as_groups(pre), as_groups(post)
    if pre_g.keys() != post_g.keys():
        raise ValueError(f"pre/post groups differ: {sorted(pre_g)} vs {sorted(post_g)}")
    out: dict[str, list[float]] = {}
    for key, pre_scores in pre_g.items():
        post_scores = post_g[key]
        if len(pre_scores) != len(post_scores):
            raise ValueError(
                f"group {key!r}: {len(pre_scores)} pre-edit vs {len(post_scores)} post-edit scores"
            )
        out[key] = [pair_agreement(a, b) for a, b in zip(pre_scores, post_scores, strict=True)]
    return out


class TokenAccuracy(RecordMeanMetric):
    """Teacher-forced token accuracy averaged per record, then over records.

    Reliability (edit success), generalization and portability (METHODS.md §6.1, §6.3). A pair's
    value is ``mean_t 1[pred_t = a_t]`` over its answer tokens (partial credit, e.g. 1/3), or with
    ``strict`` the teacher-forced exact match ``prod_t 1[pred_t = a_t]``. A record's value is the
    mean over its pairs (``aggregation="keys"`` with named groups: the mean over groups of each
    group's mean, EasyEdit's KnowEdit portability/locality aggregation). Records without any pair
    are counted in ``n_empty`` and excluded.

    Args:
        aggregation: ``"keys"`` or ``"pairs"`` (:mod:`lit_edit.metrics.aggregation`).
        strict: Score a pair 1 only if all its tokens are right.
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = TokenAccuracy()  # doctest: +SKIP
        >>> metric.update([scores_of_record_0, {"Reasoning": [...], "Subject_Aliasing": [...]}])
    """

    def __init__(self, aggregation: str = "keys", strict: bool = False, **kwargs: Any) -> None:
        super().__init__(aggregation=aggregation, **kwargs)
        self.strict = strict

    def update(self, records: Sequence[Groups[PairScore]]) -> None:
        """Add records.

        Args:
            records: Per record, its :class:`~lit_edit.scoring.PairScore` objects (flat or
                grouped by key).
        """
        self._add_records(map_groups(lambda s: pair_accuracy(s, self.strict), r) for r in records)


class LocalityAgreement(RecordMeanMetric):
    """Agreement of post-edit with pre-edit argmax tokens on the locality answer positions.

    EasyEdit's locality (METHODS.md §6.1, pitfall P11): it measures *unchanged* predictions, not
    correctness. A pair's value is ``mean_t 1[pred_pre_t = pred_post_t]`` over its answer tokens;
    records aggregate as in :class:`TokenAccuracy`.

    Args:
        aggregation: ``"keys"`` or ``"pairs"``.
        **kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    def update(self, pre: Sequence[Groups[PairScore]], post: Sequence[Groups[PairScore]]) -> None:
        """Add records.

        Args:
            pre: Per record, the pre-edit scores of its locality pairs (flat or grouped).
            post: The post-edit scores of the same pairs, same structure and order.
        """
        if len(pre) != len(post):
            raise ValueError(f"{len(pre)} pre-edit records vs {len(post)} post-edit records")
        self._add_records(_agreements(a, b) for a, b in zip(pre, post, strict=True))


class ExactMatch(RecordMeanMetric):
    """Generation-based exact match (greedy), averaged per record then over records.

    A pair is correct (1) when its greedy continuation, cut to the token length of the answer or
    of one of its aliases, equals that answer/alias after stripping surrounding whitespace
    (:func:`answer_matches`); the comparison is case-sensitive unless ``ignore_case``. Inputs come
    from :func:`lit_edit.scoring.generate_answers`.

    Args:
        aggregation: ``"keys"`` or ``"pairs"``.
        ignore_case: Compare with ``str.casefold``.
        **kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    def __init__(self, aggregation: str = "keys", ignore_case: bool = False, **kwargs: Any) -> None:
        super().__init__(aggregation=aggregation, **kwargs)
        self.ignore_case = ignore_case

    def update(self, records: Sequence[Groups[GeneratedAnswer]]) -> None:
        """Add records.

        Args:
            records: Per record, its :class:`~lit_edit.scoring.GeneratedAnswer` objects (flat or
                grouped by key).
        """
        self._add_records(
            map_groups(lambda a: float(answer_matches(a, self.ignore_case)), r) for r in records
        )
