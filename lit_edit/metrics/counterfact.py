"""CounterFact efficacy, paraphrase and neighborhood scores (ROME, METHODS.md §6.5).

With ``L(y | x) = -(1/T) sum_t log p(y_t | x, y_<t)`` the length-normalised NLL of an answer
(:attr:`lit_edit.scoring.PairScore.nll`), for each prompt ``x`` of a record::

    rewrite / paraphrase:  success = 1[L(true) > L(new)],  magnitude = e^-L(new) - e^-L(true)
    neighborhood:          success = 1[L(true) < L(new)],  magnitude = e^-L(true) - e^-L(new)

ES/EM average the rewrite values, PS/PM the paraphrase values and NS/NM the neighborhood values:
each first over the record's prompts, then over records (records without prompts of a kind are
left out of that kind). ``S = hmean(ES, PS, NS) = 3 / (1/ES + 1/PS + 1/NS)`` (0 if one of them is
0). Values are fractions; ROME's tables multiply by 100.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics import Metric

from lit_edit.scoring import PairScore

#: A prompt scored with both answers: ``(score of target_new, score of target_true)``.
Contrast = tuple[PairScore, PairScore]

_KINDS = ("rewrite", "paraphrase", "neighborhood")


@dataclass(frozen=True)
class CounterFactRecordScores:
    """One CounterFact record's scored prompts, each as ``(new, true)`` scores.

    Attributes:
        rewrite: The rewrite prompt(s) scored with ``target_new`` and ``target_true``.
        paraphrase: The paraphrase prompts, likewise.
        neighborhood: The neighborhood prompts, likewise.
    """

    rewrite: Sequence[Contrast] = ()
    paraphrase: Sequence[Contrast] = ()
    neighborhood: Sequence[Contrast] = ()


def contrast(nll_new: float, nll_true: float, neighborhood: bool = False) -> tuple[float, float]:
    """Success and magnitude of one prompt from its two length-normalised NLLs.

    Args:
        nll_new: ``L(target_new | prompt)``.
        nll_true: ``L(target_true | prompt)``.
        neighborhood: Reverse the direction (the true answer must stay more likely).

    Returns:
        ``(success, magnitude)``: ``(1[L_true > L_new], e^-L_new - e^-L_true)``, or for the
        neighborhood ``(1[L_true < L_new], e^-L_true - e^-L_new)``.
    """
    if neighborhood:
        return float(nll_true < nll_new), math.exp(-nll_true) - math.exp(-nll_new)
    return float(nll_true > nll_new), math.exp(-nll_new) - math.exp(-nll_true)


def harmonic_mean(values: Sequence[float]) -> float:
    """``n / sum_i 1/v_i``; 0 when a value is 0, NaN when one is NaN or the list is empty."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


class CounterFactScores(Metric):
    """ROME's CounterFact ES/EM, PS/PM, NS/NM and their harmonic mean S.

    States (summed across processes): for each kind ``k`` in rewrite, paraphrase, neighborhood,
    ``{k}_success`` and ``{k}_magnitude`` (sums over records of the record means, float64) and
    ``n_{k}`` (records with at least one prompt of that kind).

    Args:
        **kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for kind in _KINDS:
            for name in (f"{kind}_success", f"{kind}_magnitude"):
                self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"n_{kind}", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, records: Sequence[CounterFactRecordScores]) -> None:
        """Add records.

        Args:
            records: One :class:`CounterFactRecordScores` per record.
        """
        for record in records:
            for kind in _KINDS:
                pairs: Sequence[Contrast] = getattr(record, kind)
                if not pairs:
                    continue
                values = [contrast(n.nll, t.nll, kind == "neighborhood") for n, t in pairs]
                success = sum(v[0] for v in values) / len(values)
                magnitude = sum(v[1] for v in values) / len(values)
                setattr(self, f"{kind}_success", getattr(self, f"{kind}_success") + success)
                setattr(self, f"{kind}_magnitude", getattr(self, f"{kind}_magnitude") + magnitude)
                setattr(self, f"n_{kind}", getattr(self, f"n_{kind}") + 1)

    def compute(self) -> dict[str, torch.Tensor]:
        """The scores as float64 scalars: ``ES, EM, PS, PM, NS, NM, S`` (NaN where undefined)."""
        out: dict[str, torch.Tensor] = {}
        for kind, short in zip(_KINDS, ("E", "P", "N"), strict=True):
            n = int(getattr(self, f"n_{kind}"))
            for suffix, state in (("S", "success"), ("M", "magnitude")):
                total = getattr(self, f"{kind}_{state}")
                out[short + suffix] = total / n if n else torch.full_like(total, math.nan)
        s = harmonic_mean([float(out[k]) for k in ("ES", "PS", "NS")])
        out["S"] = torch.tensor(s, dtype=torch.float64, device=out["ES"].device)
        return out
