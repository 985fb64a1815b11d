"""torchmetrics metrics of knowledge editing; they update from scorer outputs only.

None of them tokenizes or runs a model (DESIGN.md principle 2): they take
:class:`~lit_edit.scoring.PairScore`, :class:`~lit_edit.scoring.GeneratedAnswer` objects or texts
produced by :mod:`lit_edit.scoring`. Record-averaged metrics share
:mod:`lit_edit.metrics.aggregation`; every state is summed across processes.
"""

from lit_edit.metrics.accuracy import (
    ExactMatch,
    LocalityAgreement,
    TokenAccuracy,
    answer_matches,
    pair_accuracy,
    pair_agreement,
    record_agreement,
    record_exact_match,
    record_token_accuracy,
    token_accuracy,
)
from lit_edit.metrics.aggregation import Groups, RecordMeanMetric, record_mean
from lit_edit.metrics.counterfact import (
    CounterFactRecordScores,
    CounterFactScores,
    contrast,
    harmonic_mean,
)
from lit_edit.metrics.fluency import NGramEntropy, ngram_entropy, word_tokenize
from lit_edit.metrics.perplexity import Perplexity, record_perplexity

__all__ = [
    "CounterFactRecordScores",
    "CounterFactScores",
    "ExactMatch",
    "Groups",
    "LocalityAgreement",
    "NGramEntropy",
    "Perplexity",
    "RecordMeanMetric",
    "TokenAccuracy",
    "answer_matches",
    "contrast",
    "harmonic_mean",
    "ngram_entropy",
    "pair_accuracy",
    "pair_agreement",
    "record_agreement",
    "record_exact_match",
    "record_mean",
    "record_perplexity",
    "record_token_accuracy",
    "token_accuracy",
    "word_tokenize",
]
