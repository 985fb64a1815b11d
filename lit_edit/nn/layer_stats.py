"""Cached layer statistics: the second moment of a layer's inputs over a text corpus.

Locate-then-edit methods (ROME, MEMIT, AlphaEdit) weigh their closed-form update by
``C = E[k kᵀ]``, the uncentred second moment of the keys ``k`` (the inputs of an MLP output
matrix) over a large corpus. Computing it is the expensive part of those methods and it depends
only on the model's weights, the layer, the corpus and how much of it was read, so it is computed
once and cached as a safetensors file (never a pickle) whose metadata names exactly what it was
computed from; a file whose metadata does not match its key is refused, not used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class StatsKey:
    """What a cached statistic was computed from.

    Attributes:
        model: The model's identity: a name or path plus :func:`model_fingerprint` of its
            weights (two models with the same name but other weights must not share stats).
        layer: Name of the module whose inputs are measured (e.g. ``transformer.h.3.mlp.c_proj``).
        corpus: Identity of the text corpus (a dataset name and split, or a digest of the texts).
        max_tokens: At most this many (non-padding) tokens were read.
        max_length: Texts were truncated to this many tokens.
    """

    model: str
    layer: str
    corpus: str
    max_tokens: int
    max_length: int

    def digest(self) -> str:
        """A short stable digest of the key (the cache file's name)."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter's name, shape, dtype and bytes.

    Args:
        model: Any module.

    Returns:
        16 hex characters; equal for bit-identical weights.
    """
    h = hashlib.sha256()
    for name, param in model.state_dict().items():
        h.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        h.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def texts_fingerprint(texts: Iterable[str]) -> str:
    """A digest of a sequence of texts, in order (a corpus identity for :class:`StatsKey`)."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class _Captured(Exception):
    """Raised by the capture hook once the layer's input is read: ends the forward early."""


def input_second_moment(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layer: str,
    texts: Sequence[str],
    max_tokens: int,
    max_length: int = 128,
    batch_size: int = 16,
) -> tuple[torch.Tensor, int]:
    """``E[k kᵀ]`` of the inputs ``k`` of module ``layer`` over the non-padding tokens of ``texts``.

    Accumulated in float64, in text order, stopping once ``max_tokens`` tokens were counted
    (the last batch is cut to exactly that many). Each forward stops at ``layer`` (the blocks
    above it are not run) and builds no graph; a progress bar counts the tokens on a terminal.

    Args:
        model: A causal LM (left in the mode it was in; run in ``eval`` mode for statistics).
        tokenizer: Its tokenizer (needs a pad token).
        layer: Module name, e.g. ``transformer.h.3.mlp.c_proj``.
        texts: The corpus, in order.
        max_tokens: Token budget (> 0).
        max_length: Truncation length of each text.
        batch_size: Texts per forward pass.

    Returns:
        ``(moment, n_tokens)``: the ``(d, d)`` float32 second moment and the tokens it averages.

    Raises:
        ValueError: on an unknown layer, a non-positive budget, or a corpus with no tokens.
    """
    moments, n = input_second_moments(model, tokenizer, [layer], texts, max_tokens, max_length,
                                      batch_size)
    return moments[0], n


@torch.no_grad()
def input_second_moments(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[str],
    texts: Sequence[str],
    max_tokens: int,
    max_length: int = 128,
    batch_size: int = 16,
) -> tuple[list[torch.Tensor], int]:
    """:func:`input_second_moment` of several modules from one pass over ``texts``.

    Each forward stops once every module's input is read (at the last of them); each moment is
    the one :func:`input_second_moment` gives for its module alone, bit for bit (the same
    forwards up to that module, the same float64 sums).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer (needs a pad token).
        layers: Module names (distinct).
        texts: The corpus, in order.
        max_tokens: Token budget (> 0).
        max_length: Truncation length of each text.
        batch_size: Texts per forward pass.

    Returns:
        ``(moments, n_tokens)``: one ``(d, d)`` float32 moment per module, in order, and the
        tokens they average.

    Raises:
        ValueError: on an unknown or repeated layer, a non-positive budget, or a corpus with no
            tokens.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    modules = dict(model.named_modules())
    for layer in layers:
        if layer not in modules:
            raise ValueError(f"the model has no module {layer!r}")
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"need distinct module names, got {list(layers)}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token to batch the corpus")
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Any:
        """The pre-hook of module ``name``: it keeps the module's input."""

        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            """Keep the input; stop the forward once every module's is kept."""
            captured[name] = args[0].detach()
            if len(captured) == len(layers):
                raise _Captured

        return hook

    handles = [modules[layer].register_forward_pre_hook(capture(layer)) for layer in layers]
    device = next(model.parameters()).device
    totals: list[torch.Tensor | None] = [None] * len(layers)
    n = 0
    bar = tqdm(total=max_tokens, unit="tok", desc=f"second moment of {', '.join(layers)}",
               leave=False, disable=None)  # shown on a terminal only
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt",
                              padding=True, truncation=True, max_length=max_length,
                              padding_side="right")  # causal: real tokens never see the pads
            captured.clear()
            try:
                model(input_ids=batch["input_ids"].to(device),
                      attention_mask=batch["attention_mask"].to(device))
            except _Captured:
                pass
            real = batch["attention_mask"].reshape(-1).bool().to(device)
            for i, layer in enumerate(layers):
                keys = captured[layer].reshape(-1, captured[layer].shape[-1])  # (batch·seq, d)
                keys = keys[real][: max_tokens - n].double()  # (tokens, d)
                part = keys.T @ keys  # (d, d)
                totals[i] = part if totals[i] is None else totals[i] + part
            step = min(int(real.sum()), max_tokens - n)
            n += step
            bar.update(step)
            if n >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    if n == 0 or any(t is None for t in totals):
        raise ValueError(f"the corpus gave no tokens for {list(layers)}")
    return [(t / n).float() for t in totals], n


class LayerStatsCache:
    """Layer statistics on disk, one safetensors file per :class:`StatsKey`.

    Args:
        root: Directory; default ``$LIT_EDIT_CACHE/layer_stats`` (``~/.cache/lit_edit``).
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        if root is None:
            base = os.environ.get("LIT_EDIT_CACHE") or Path.home() / ".cache" / "lit_edit"
            root = Path(base).expanduser() / "layer_stats"
        self.root = Path(root)

    def path(self, key: StatsKey) -> Path:
        """The file that holds (or will hold) ``key``'s statistic."""
        return self.root / f"{key.digest()}.safetensors"

    def get(self, key: StatsKey, compute: Callable[[], tuple[torch.Tensor, int]]) -> torch.Tensor:
        """The cached statistic of ``key`` (see :meth:`get_with_count`)."""
        return self.get_with_count(key, compute)[0]

    def get_with_count(
        self, key: StatsKey, compute: Callable[[], tuple[torch.Tensor, int]]
    ) -> tuple[torch.Tensor, int]:
        """The cached statistic of ``key``, computed with ``compute()`` and stored when absent.

        Args:
            key: What the statistic is of.
            compute: Returns ``(statistic, n_tokens)`` (e.g. a call of
                :func:`input_second_moment` with the key's settings).

        Returns:
            ``(statistic, n_tokens)``: the statistic (float32) and the tokens it averages.

        Raises:
            ValueError: when the file's recorded key is not ``key`` (a corrupt or foreign file).
        """
        path = self.path(key)
        expected = {k: str(v) for k, v in asdict(key).items()}
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            recorded = {k: v for k, v in metadata.items() if k in expected}
            if recorded != expected:
                raise ValueError(f"{path}: recorded key {recorded} is not {expected}; "
                                 "delete the file to recompute it")
            return load_file(str(path))["moment"], int(metadata.get("n_tokens", 0))
        moment, n_tokens = compute()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"moment": moment.contiguous()}, str(tmp),
                  metadata={**expected, "n_tokens": str(n_tokens)})
        tmp.replace(path)
        return moment, n_tokens


def moment_without(
    moment: torch.Tensor,
    n_tokens: int,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layer: str,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 16,
) -> torch.Tensor:
    """The second moment of a corpus with some of its texts taken out, without re-reading it.

    ``C' = (N·C − n·C_ex) / (N − n)`` where ``C_ex`` is :func:`input_second_moment` of ``texts``
    (``n`` tokens). Exact when ``texts`` were read in full when ``C`` was computed (the corpus
    was not cut by its token budget), e.g. to keep the facts being edited out of ``C``
    (LOCATE_THEN_EDIT.md §9.4).

    Args:
        moment: ``(d, d)`` second moment ``C`` of the whole corpus.
        n_tokens: The ``N`` tokens it averages.
        model: The model ``C`` was computed with (same weights).
        tokenizer: Its tokenizer.
        layer: The module whose inputs ``C`` is of.
        texts: Texts of the corpus to take out (may be empty).
        max_length: Truncation length used for ``C``.
        batch_size: Texts per forward pass.

    Returns:
        ``(d, d)`` float32 ``C'``.

    Raises:
        ValueError: if the texts hold all of the corpus's tokens.
    """
    return moments_without([(moment, n_tokens)], model, tokenizer, [layer], texts, max_length,
                           batch_size)[0]


def moments_without(
    moments: Sequence[tuple[torch.Tensor, int]],
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[str],
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """:func:`moment_without` of several modules, the texts read once for all of them.

    Args:
        moments: ``(C, N)`` of each module, in the order of ``layers``.
        model: The model the moments were computed with.
        tokenizer: Its tokenizer.
        layers: The modules (distinct).
        texts: Texts of the corpus to take out (may be empty).
        max_length: Truncation length used for the moments.
        batch_size: Texts per forward pass.

    Returns:
        One ``(d, d)`` float32 ``C'`` per module, each equal to :func:`moment_without`'s.

    Raises:
        ValueError: if the texts hold all of a corpus's tokens.
    """
    if not texts:
        return [moment for moment, _ in moments]
    excluded, n = input_second_moments(model, tokenizer, layers, texts, max_tokens=2**62,
                                       max_length=max_length, batch_size=batch_size)
    out = []
    for (moment, n_tokens), ex in zip(moments, excluded, strict=True):
        if n >= n_tokens:
            raise ValueError(f"taking out {n} of {n_tokens} tokens leaves no statistic")
        total = moment.double() * n_tokens - ex.double() * n
        out.append((total / (n_tokens - n)).float())
    return out
