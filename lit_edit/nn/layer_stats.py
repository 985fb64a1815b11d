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


@torch.no_grad()
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
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"the model has no module {layer!r}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token to batch the corpus")
    captured: list[torch.Tensor] = []

    def capture(_m: nn.Module, args: tuple[Any, ...]) -> None:
        """Keep the layer's input and stop the forward there (nothing above it is needed)."""
        captured.append(args[0].detach())
        raise _Captured

    handle = modules[layer].register_forward_pre_hook(capture)
    device = next(model.parameters()).device
    total: torch.Tensor | None = None
    n = 0
    bar = tqdm(total=max_tokens, unit="tok", desc=f"second moment of {layer}", leave=False,
               disable=None)  # shown on a terminal only
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
            keys = captured[0].reshape(-1, captured[0].shape[-1])  # (batch·seq, d)
            keys = keys[batch["attention_mask"].reshape(-1).bool().to(device)]  # (tokens, d)
            keys = keys[: max_tokens - n].double()
            part = keys.T @ keys  # (d, d)
            total = part if total is None else total + part
            n += keys.shape[0]
            bar.update(keys.shape[0])
            if n >= max_tokens:
                break
    finally:
        handle.remove()
        bar.close()
    if total is None or n == 0:
        raise ValueError(f"the corpus gave no tokens for {layer!r}")
    return (total / n).float(), n


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
    if not texts:
        return moment
    excluded, n = input_second_moment(model, tokenizer, layer, texts, max_tokens=2**62,
                                      max_length=max_length, batch_size=batch_size)
    if n >= n_tokens:
        raise ValueError(f"taking out {n} of {n_tokens} tokens leaves no statistic")
    total = moment.double() * n_tokens - excluded.double() * n
    return (total / (n_tokens - n)).float()
