"""Helpers shared by the scorer and the generation loops (no model-specific code)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn

#: Called with the owner (edit index) of each row of a batch; the batch's forwards run inside
#: the context it returns (parallel single edits: each row sees its own edit).
RowContext = Callable[[Sequence[int]], AbstractContextManager]


def owner_context(row_context: RowContext | None, owners: Sequence[int]) -> AbstractContextManager:
    """``row_context(owners)``, or a context that does nothing without one."""
    return row_context(owners) if row_context is not None else contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless module."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run in eval mode under ``torch.inference_mode()``; restore every submodule's mode on exit.

    Modes are restored per submodule, so a model whose parts were in different modes (e.g. a
    frozen backbone in eval mode inside a training editor) is left exactly as it was.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, training in modes:
            module.training = training


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes Hugging Face's ``logits_to_keep`` (last K positions only).

    Wrappers exposing the wrapped model as ``base_model`` are looked through.
    """
    while True:
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            return True
        inner = getattr(model, "base_model", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return False
        model = inner


def cache_argument(model: nn.Module) -> str:
    """The name of the key/value cache argument of ``model.forward``.

    ``"cache"`` in recent transformers (``past_key_values`` is deprecated there), else
    ``"past_key_values"``. Wrappers exposing the wrapped model as ``base_model`` are looked
    through (and a peft model's ``get_base_model()``).
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    while True:
        if "cache" in inspect.signature(model.forward).parameters:
            return "cache"
        inner = getattr(model, "base_model", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return "past_key_values"
        model = inner


def output_cache(output: object) -> object | None:
    """The key/value cache of a model output (``cache`` or ``past_key_values``), if any."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def output_logits(output: object) -> torch.Tensor:
    """Logits of a model output: a tensor, an object with ``.logits``, or a tuple (first item)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group indices into batches of similar length, longest first (stable among equals).

    Args:
        lengths: Length of each item.
        batch_size: Maximum items per batch.

    Returns:
        Lists of indices into ``lengths``; every index appears once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def truncate_prompt(
    prompt_ids: list[int], room: int, bos_id: int | None, what: str = "the prompt"
) -> list[int]:
    """Keep the last ``room`` tokens of a prompt, and its leading BOS if it has one.

    Args:
        prompt_ids: Token ids of the prompt.
        room: Most tokens the prompt may keep (its BOS included).
        bos_id: The tokenizer's BOS id (``None``: no BOS).
        what: Description of the sequence, for the error message.

    Returns:
        ``prompt_ids`` itself when it fits, else its BOS (if any) and its last tokens.

    Raises:
        ValueError: when not even one prompt token besides the BOS fits.
    """
    if len(prompt_ids) <= room:
        return prompt_ids
    head = prompt_ids[:1] if bos_id is not None and prompt_ids[:1] == [bos_id] else []
    keep = room - len(head)
    if keep < 1:
        raise ValueError(f"{what} does not fit in max_length with a prompt token")
    return head + prompt_ids[-keep:]



def check_positions(
    model: nn.Module,
    lengths: Sequence[int],
    describe: Callable[[int], str],
) -> None:
    """Refuse sequences longer than a learned position table (GPT-2's ``n_positions``).

    A model with learned absolute positions crashes with an index error deep in its embedding
    on a longer sequence; this names the sequence instead. Models without such a table (RoPE:
    LLaMA, Qwen) are not limited here.

    Args:
        model: The model about to run (``model.config.n_positions`` is read when present).
        lengths: Total tokens of each sequence (prompt plus answer or generation budget).
        describe: Index → a description of that sequence for the error (its prompt, say).

    Raises:
        ValueError: naming the first sequence that does not fit and how to make it fit.
    """
    limit = getattr(getattr(model, "config", None), "n_positions", None)
    if not isinstance(limit, int):
        return
    for i, length in enumerate(lengths):
        if length > limit:
            raise ValueError(
                f"{describe(i)} needs {length} positions and the model has {limit} "
                f"(config.n_positions): set evaluation.max_length (e.g. --evaluation.max_length "
                f"{limit}) to truncate prompts from the left, or use a model with more positions"
            )
