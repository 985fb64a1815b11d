"""Longer contexts for models pretrained on short ones (LTE prompts on the TinyFacts model)."""

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
