"""Second moments ``C`` of edited matrices' inputs over one corpus, per layer, for an editor.

ROME, MEMIT and AlphaEdit weigh (or project) their updates by ``C = E[k kᵀ]`` of the keys of
each edited matrix (LOCATE_THEN_EDIT.md §1.4). :class:`CorpusMoments` reads the corpus once,
computes ``C`` per layer on first use from the weights as they are then (the unedited ones: every
protocol's first edit starts from them), caches it on disk
(:class:`~lit_edit.nn.layer_stats.LayerStatsCache`, keyed by the weights' fingerprint, the layer,
the corpus and the token budget) and, when asked, takes the texts naming the edited subjects out
of it exactly (§9.4: on TinyFacts the corpus is the model's own pretraining text).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_edit.nn.layer_stats import (
    LayerStatsCache,
    StatsKey,
    input_second_moment,
    model_fingerprint,
    moments_without,
    texts_fingerprint,
)
from lit_edit.records import DataFileError

_HUB = "hf://"  # a hub dataset, as for the data files (lit_edit.data.arrow)


def read_corpus(corpus: str, model_name: str, column: str = "text") -> list[str]:
    """The texts of a statistics corpus.

    Args:
        corpus: ``"world"`` (the pretraining text of the TinyFacts world of ``model_name``); a
            ``.txt`` (one document per line), ``.jsonl`` (one JSON object per line with the
            text under ``column``) or ``.parquet`` file; or a Hugging Face dataset,
            ``hf://ORG/NAME:SPLIT`` or ``hf://ORG/NAME:CONFIG:SPLIT``, where ``SPLIT`` may
            take ``datasets``' slice syntax (``hf://wikimedia/wikipedia:20231101.en:train[:100000]``).
            Files of other kinds ``datasets`` reads (``.csv``, ``.arrow``) go through it too.
        model_name: The backbone's name (for ``"world"``).
        column: The text column of a ``.jsonl`` file, a table or a hub dataset.

    Returns:
        The documents (empty ones left out), in order.

    Raises:
        DataFileError: naming the corpus (and the line) for a missing file, a line that is
            not a JSON object with a string ``column``, a table without ``column``, a hub
            dataset that cannot be loaded (e.g. offline), or a corpus with no text.
    """
    if corpus == "world":
        from lit_edit.data.tinyfacts import load_tinyfacts_world

        return load_tinyfacts_world(model_name).pretraining_texts()
    if corpus.startswith(_HUB):
        texts = _dataset_texts(corpus, column)
    else:
        path = Path(corpus)
        if not path.is_file():
            raise DataFileError(corpus, "no such corpus file (mom2_corpus)")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            texts = path.read_text(encoding="utf-8").splitlines()
        elif suffix == ".jsonl":
            texts = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[column]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataFileError(corpus, f"line {i + 1} is not a JSON object with a "
                                        f"{column!r} text ({type(e).__name__})") from e
                if not isinstance(text, str):
                    raise DataFileError(corpus, f"line {i + 1}: {column!r} is a "
                                        f"{type(text).__name__}, not a text")
                texts.append(text)
        else:
            texts = _dataset_texts(corpus, column)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataFileError(corpus, "the corpus holds no text")
    return texts


def _dataset_texts(corpus: str, column: str) -> list[str]:
    """The ``column`` of a hub dataset (``hf://…``) or a local table, read by ``datasets``."""
    import datasets

    try:
        if corpus.startswith(_HUB):
            found = re.fullmatch(r"([^:\[]+)(?::([^:\[]+))?:([^:\[]+(?:\[[^\]]*\])?)",
                                 corpus[len(_HUB):])  # NAME[:CONFIG]:SPLIT[slice]
            if found is None:
                raise DataFileError(corpus, f"expected {_HUB}ORG/NAME:SPLIT or "
                                    f"{_HUB}ORG/NAME:CONFIG:SPLIT")
            name, config, split = found.groups()
            table = datasets.load_dataset(name, config, split=split)
        else:
            kind = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(
                Path(corpus).suffix.lower())
            if kind is None:
                raise DataFileError(corpus, "a corpus file is .txt, .jsonl, .parquet, .csv or "
                                    ".arrow")
            table = datasets.load_dataset(kind, data_files=corpus, split="train")
    except DataFileError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataFileError(corpus, f"cannot load with `datasets`: {type(e).__name__}: "
                            f"{first}") from e
    if column not in table.column_names:
        raise DataFileError(corpus, f"has no column {column!r} (columns: "
                            f"{', '.join(table.column_names)})")
    return [t for t in table[column] if isinstance(t, str)]


class CorpusMoments:
    """Per-layer second moments of a model's matrix inputs over one corpus (cached).

    Args:
        model: The model (its weights at the first :meth:`moment` of a layer are the ones
            measured).
        tokenizer: Its tokenizer.
        model_name: The backbone's name (part of the cache key, and the TinyFacts world).
        corpus: ``"world"``, a ``.txt`` / ``.jsonl`` / ``.parquet`` file or a hub dataset
            ``hf://ORG/NAME[:CONFIG]:SPLIT`` (:func:`read_corpus`).
        max_tokens: Token budget of each ``C``.
        max_length: Each document is truncated to this many tokens.
        batch_size: Documents per forward pass.
        stats_dir: Directory of the cache (default ``~/.cache/lit_edit/layer_stats``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        model_name: str,
        corpus: str = "world",
        max_tokens: int = 1_000_000,
        max_length: int = 128,
        batch_size: int = 16,
        stats_dir: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.corpus_name = corpus
        self.max_tokens = max_tokens
        self.max_length = max_length
        self.batch_size = batch_size
        self.cache = LayerStatsCache(stats_dir)
        self._texts: list[str] | None = None
        self._moments: dict[str, tuple[torch.Tensor, int]] = {}

    def texts(self) -> list[str]:
        """The corpus (read once)."""
        if self._texts is None:
            self._texts = read_corpus(self.corpus_name, self.model_name)
        return self._texts

    def moment(self, layer: str) -> tuple[torch.Tensor, int]:
        """``(C, n_tokens)`` of the inputs of module ``layer`` (computed once, cached on disk)."""
        if layer not in self._moments:
            texts = self.texts()
            key = StatsKey(
                model=f"{self.model_name}@{model_fingerprint(self.model)}",
                layer=layer,
                corpus=f"{self.corpus_name}@{texts_fingerprint(texts)}",
                max_tokens=self.max_tokens,
                max_length=self.max_length,
            )

            def compute() -> tuple[torch.Tensor, int]:
                """The second moment and its token count, read from ``texts``."""
                return input_second_moment(self.model, self.tokenizer, layer, texts,
                                           self.max_tokens, self.max_length, self.batch_size)

            moment, n = self.cache.get_with_count(key, compute)
            device = next(self.model.parameters()).device
            self._moments[layer] = (moment.to(device), n)
        return self._moments[layer]

    def mentions(self, subjects: Sequence[str]) -> list[str]:
        """The corpus texts naming any of ``subjects`` (as whole words)."""
        if not subjects:
            return []
        names = "|".join(re.escape(s) for s in sorted(set(subjects), key=len, reverse=True))
        pattern = re.compile(rf"(?<!\w)(?:{names})(?!\w)")
        return [t for t in self.texts() if pattern.search(t)]

    def moment_without_subjects(
        self, layer: str, subjects: Sequence[str], owner: str = "the editor"
    ) -> torch.Tensor:
        """``C`` of ``layer`` with every corpus text naming one of ``subjects`` taken out.

        Exact (by subtraction, :func:`~lit_edit.nn.layer_stats.moment_without`); needs the whole
        corpus within the token budget.

        Args:
            layer: Module name.
            subjects: The subjects being edited.
            owner: Who asks (named in the error), e.g. ``"ROMEEditor"``.

        Raises:
            ValueError: when the corpus was cut by ``max_tokens``.
        """
        return self.moments_without_subjects([layer], subjects, owner)[0]

    def moments_without_subjects(
        self, layers: Sequence[str], subjects: Sequence[str], owner: str = "the editor"
    ) -> list[torch.Tensor]:
        """:meth:`moment_without_subjects` of several modules, the texts read in one pass.

        Args:
            layers: Module names (distinct).
            subjects: The subjects being edited.
            owner: Who asks (named in the error).

        Raises:
            ValueError: when the corpus was cut by ``max_tokens``.
        """
        moments = [self.moment(layer) for layer in layers]
        if any(n >= self.max_tokens for _, n in moments):
            raise ValueError(
                f"{owner}: mom2_exclude_subject needs the whole corpus in C, but it was cut at "
                f"mom2_max_tokens={self.max_tokens}: raise it or set mom2_exclude_subject: false"
            )
        return moments_without(moments, self.model, self.tokenizer, list(layers),
                               self.mentions(subjects), self.max_length, self.batch_size)
