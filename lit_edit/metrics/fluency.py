"""Fluency as weighted n-gram entropy of generated text (ROME's definition, METHODS.md §6.2).

For one text with word tokens ``w_1..w_m`` and ``n``-gram frequency distribution ``p_n``::

    H_n = - sum_g p_n(g) log2 p_n(g)              (0 when the text has fewer than n words)
    E   = mean( (2/3) H_2 , (4/3) H_3 )           (arithmetic mean of the weighted entropies)

A record's value is the mean of ``E`` over its generated texts, the metric the mean over records
(EasyEdit reports it x100 in KnowEdit tables, e.g. 5.53 -> 553).

Word tokenization approximates ``nltk.word_tokenize`` without nltk: a Punkt-like sentence split
(a word ending in ``?``, ``!`` or a single ``.``, before optional closing quotes/brackets, ends a
sentence, unless it is a common abbreviation such as ``Mr.``, an initial such as ``J.`` or has an
inner period such as ``U.S.``), then a port of NLTK's improved Treebank word tokenizer (quotes,
punctuation, brackets, ``--``, contractions such as ``don't -> do n't``), whose one use of the
split is that a sentence-final period becomes its own token. Punkt's learned abbreviation,
collocation and orthographic statistics are not reproduced, so rare boundaries (and so a
``word.`` vs ``word .``) may differ; n-gram counts on generated text are barely affected. Text
is NFKD-normalised first, as in ROME's ``generate_fast`` post-processing.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

from lit_edit.metrics.aggregation import RecordMeanMetric

# Common English abbreviations Punkt does not treat as sentence ends (lower case, no period).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc inc ltd co corp jan feb mar apr jun jul aug sep sept "
    "oct nov dec no fig al gen col lt sgt rev ph e.g i.e approx dept est".split()
)
_CLOSERS = "\"')]}»”’"

# (pattern, replacement) steps of NLTK's NLTKWordTokenizer, applied in order.
_STARTING_QUOTES = (
    (re.compile(r"([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r"^\""), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
)
_PUNCTUATION = (
    (re.compile(r"([^\.])(\.)([\]\)}>\"\'»”’ ]*)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r"([^\.])(\.)([\]\)}>\"\']*)\s*$"), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
    (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> "),
    (re.compile(r"--"), r" -- "),
)
_ENDING_QUOTES = (
    (re.compile(r"([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
)
_CONTRACTIONS = tuple(
    re.compile(p)
    for p in (
        r"(?i)\b(can)(not)\b",
        r"(?i)\b(d)('ye)\b",
        r"(?i)\b(gim)(me)\b",
        r"(?i)\b(gon)(na)\b",
        r"(?i)\b(got)(ta)\b",
        r"(?i)\b(lem)(me)\b",
        r"(?i)\b(more)('n)\b",
        r"(?i)\b(wan)(na)(?=\s)",
        r"(?i) ('t)(is)\b",
        r"(?i) ('t)(was)\b",
    )
)


def _ends_sentence(word: str, is_last: bool) -> bool:
    """Whether the whitespace-delimited ``word`` ends a sentence (Punkt-like heuristic)."""
    core = word.rstrip(_CLOSERS)
    if core.endswith(("?", "!")):
        return True
    if not core.endswith(".") or core.endswith(".."):
        return False
    if is_last:
        return True
    stem = core[:-1].lstrip("\"'([{«“‘`")
    if not stem or stem.lower() in _ABBREVIATIONS or "." in stem:
        return False
    return not (len(stem) == 1 and stem.isalpha())  # an initial


def split_sentences(text: str) -> list[str]:
    """Split text into sentences, approximating NLTK's Punkt (see the module docstring)."""
    words = text.split()
    sentences: list[list[str]] = [[]]
    for i, word in enumerate(words):
        sentences[-1].append(word)
        if _ends_sentence(word, i + 1 == len(words)):
            sentences.append([])
    return [" ".join(s) for s in sentences if s]


def _treebank(sentence: str) -> list[str]:
    """NLTK's improved Treebank word tokenizer on one sentence."""
    text = sentence
    for pattern, repl in _STARTING_QUOTES + _PUNCTUATION:
        text = pattern.sub(repl, text)
    text = f" {text} "
    for pattern, repl in _ENDING_QUOTES:
        text = pattern.sub(repl, text)
    for pattern in _CONTRACTIONS:
        text = pattern.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """Word tokens of ``text``, approximating ``nltk.word_tokenize`` (see the module docstring).

    Example:
        >>> word_tokenize("Alice doesn't live in Paris. She moved to Lyon, France.")
        ['Alice', 'does', "n't", 'live', 'in', 'Paris', '.', 'She', 'moved', 'to', 'Lyon', ',', \
'France', '.']
    """
    return [tok for sent in split_sentences(text) for tok in _treebank(sent)]


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's ``compute_n_gram_entropy`` of one text: ``mean_n(w_n * H_n)`` in bits.

    Args:
        text: The text (NFKD-normalised before tokenization).
        ns: N-gram orders.
        weights: One weight per order.

    Returns:
        The weighted mean entropy; an order with no n-gram contributes 0.
    """
    if len(ns) != len(weights) or not ns:
        raise ValueError("ns and weights must be non-empty and of the same length")
    tokens = word_tokenize(unicodedata.normalize("NFKD", text))
    values = []
    for n, weight in zip(ns, weights, strict=True):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        values.append(weight * entropy)
    return sum(values) / len(values)


class NGramEntropy(RecordMeanMetric):
    """Fluency: weighted 2/3-gram entropy of generated texts, per record then over records.

    Feed the texts of :func:`lit_edit.scoring.sample_top_k` (``Generation.full_text``, prompt
    included as in ROME/EasyEdit). A record with no text counts in ``n_empty``.

    Args:
        ns: N-gram orders (ROME: 2 and 3).
        weights: Their weights (ROME: 2/3 and 4/3).
        **kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    def __init__(
        self,
        ns: Sequence[int] = (2, 3),
        weights: Sequence[float] = (2 / 3, 4 / 3),
        **kwargs: Any,
    ) -> None:
        super().__init__(aggregation="pairs", **kwargs)
        if len(ns) != len(weights) or not ns:
            raise ValueError("ns and weights must be non-empty and of the same length")
        self.ns = tuple(ns)
        self.weights = tuple(weights)

    def update(self, records: Sequence[str | Sequence[str]]) -> None:
        """Add records.

        Args:
            records: Per record, one generated text or a sequence of them.
        """
        self._add_records(
            [ngram_entropy(t, self.ns, self.weights) for t in ([r] if isinstance(r, str) else r)]
            for r in records
        )
