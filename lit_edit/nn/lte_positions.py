"""Backbone adjustments before LTE alignment: a longer context, dropout."""

from __future__ import annotations

import torch
from torch import nn


def extend_context(model: nn.Module, length: int, seed: int = 0) -> bool:
    """Let ``model`` take sequences of up to ``length`` tokens.

    A learned absolute position table (GPT-2's ``wpe``) shorter than ``length`` gets new rows
    drawn from ``N(0, initializer_range)`` (seeded; GPT-2's own initialisation), the existing rows
    kept; alignment then trains them. Rotary models (LLaMA) only have their configured maximum
    raised. Nothing changes when the model already takes ``length`` tokens.

    Args:
        model: A Hugging Face causal LM.
        length: Longest sequence the model must take.
        seed: Seed of the new rows.

    Returns:
        Whether the model was changed.

    Raises:
        ValueError: for a model with neither a known position table nor a rotary configuration.
    """
    config = model.config
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    if isinstance(wpe, nn.Embedding):
        old = wpe.num_embeddings
        if old >= length:
            return False
        gen = torch.Generator().manual_seed(seed)
        std = float(getattr(config, "initializer_range", 0.02))
        extra = torch.randn(length - old, wpe.embedding_dim, generator=gen) * std
        table = nn.Embedding(length, wpe.embedding_dim, dtype=wpe.weight.dtype)
        with torch.no_grad():
            table.weight[:old] = wpe.weight
            table.weight[old:] = extra.to(wpe.weight.dtype)
        table.weight.requires_grad_(wpe.weight.requires_grad)
        model.transformer.wpe = table.to(wpe.weight.device)
        config.n_positions = length
        return True
    if getattr(config, "rope_theta", None) is not None or hasattr(config, "rope_scaling"):
        if config.max_position_embeddings >= length:
            return False
        config.max_position_embeddings = length
        return True
    raise ValueError(
        f"cannot extend the context of {type(model).__name__}: no learned position table "
        "(transformer.wpe) and no rotary configuration"
    )


def set_dropout(model: nn.Module, p: float) -> int:
    """Set the probability of every ``nn.Dropout`` of ``model`` (and its config's ``*pdrop``).

    Args:
        model: A Hugging Face model.
        p: Dropout probability in ``[0, 1)``.

    Returns:
        The number of dropout modules changed.

    Raises:
        ValueError: for ``p`` outside ``[0, 1)`` or a model without dropout modules.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    modules = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no dropout modules to set")
    for module in modules:
        module.p = p
    config = getattr(model, "config", None)
    for name in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout"):
        if config is not None and hasattr(config, name):
            setattr(config, name, p)
    return len(modules)
