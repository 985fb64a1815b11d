"""Batched teacher-forced scoring and generation: the one place evaluation runs a model.

* :class:`Scorer` / :class:`PairScore`: teacher-forced per-token outputs of (prompt, answer) pairs.
* :func:`greedy_generate`, :func:`generate_answers`: greedy decoding (generation exact match).
* :func:`sample_top_k`: seeded top-k sampling (fluency).
"""

from lit_edit.scoring.generation import (
    GeneratedAnswer,
    Generation,
    generate_answers,
    greedy_generate,
    sample_top_k,
)
from lit_edit.scoring.scorer import PairScore, Scorer
from lit_edit.scoring.utils import evaluating, model_device

__all__ = [
    "GeneratedAnswer",
    "Generation",
    "PairScore",
    "Scorer",
    "evaluating",
    "generate_answers",
    "greedy_generate",
    "model_device",
    "sample_top_k",
]
