"""Replaying the frozen part of a forward pass below an edited matrix, once per edit.

An edit-time optimisation (WISE's side copy, FT's matrix, a value vector) runs the same batch
through the model at every step, and everything *below* the edited matrix — the blocks before
its block, and inside its block the attention and the MLP's input projections when the edited
matrix is the MLP output — computes the same outputs every time: nothing there depends on the
tensors being optimised. :func:`replay_frozen` computes them once and hands the same tensors
back at the later steps.

It is exact by construction: a module's output is replayed only when the module is called
again with inputs equal to the first call's (every tensor argument equal, element for element;
every other argument a plain value equal to the first — never an object such as a key/value
cache, which may change inside), no input and no output requires grad (nothing of the replayed
part is being trained) and the module is in eval mode (no dropout). Anything else runs the
module as usual, so an optimisation run inside the context takes the same values, bit for bit,
as one run outside it (``tests/test_frozen_prefix.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lit_edit.nn.layout import architecture_of, num_layers


def _same(a: Any, b: Any) -> bool:
    """Whether two call arguments are equal (tensors element for element, others identical)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                          and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (bool, int, float, str, type(None))) and type(a) is type(b):
        return a == b
    return False  # any other object (e.g. a key/value cache) may have changed inside


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside ``value`` (nested tuples, lists, dicts and model outputs)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class _Replay:
    """A module's ``forward`` that hands back its first output while the inputs stay the same.

    Args:
        module: The module (its ``forward`` is called for real on a first or changed input).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.forward = module.forward
        self.inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.output: Any = None
        self.calls = 0
        self.replays = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The module's output: replayed when the inputs equal the remembered ones."""
        self.calls += 1
        if self.inputs is not None and _same(self.inputs, (args, kwargs)):
            self.replays += 1
            return self.output
        output = self.forward(*args, **kwargs)
        frozen = not self.module.training and not any(
            t.requires_grad for t in (*_tensors((args, kwargs)), *_tensors(output)))
        self.inputs, self.output = ((args, kwargs), output) if frozen else (None, None)
        return output


def frozen_modules(model: nn.Module, param_name: str) -> list[nn.Module]:
    """The modules below ``param_name`` whose outputs cannot depend on it.

    Args:
        model: A model of a known architecture (:func:`~lit_edit.nn.layout.architecture_of`).
        param_name: The edited tensor, e.g. ``"transformer.h.2.mlp.c_proj.weight"``.

    Returns:
        The blocks before the tensor's block; when the tensor is that block's MLP output matrix
        also the block's attention and MLP input projections. Empty for an unknown architecture
        or a tensor outside the blocks (nothing is replayed then).
    """
    try:
        arch = architecture_of(model)
    except ValueError:
        return []
    head, _, rest = param_name.partition(f"{arch.blocks}.")
    index, _, inner = rest.partition(".")
    if head or not index.isdigit() or int(index) >= num_layers(model):
        return []
    blocks = model.get_submodule(arch.blocks)
    k = int(index)
    out: list[nn.Module] = [blocks[i] for i in range(k)]
    if inner == f"{arch.mlp_out}.weight":
        names = (arch.attention, *arch.mlp_in)
        out += [blocks[k].get_submodule(n) for n in names if _has(blocks[k], n)]
    return out


def _has(module: nn.Module, name: str) -> bool:
    """Whether ``module`` has a submodule called ``name``."""
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


@contextmanager
def replay_frozen(model: nn.Module, param_names: str | Sequence[str]) -> Iterator[list[_Replay]]:
    """Inside: the modules frozen for every one of ``param_names`` replay their outputs.

    Args:
        model: The model being optimised.
        param_names: The tensor(s) the optimisation changes (names in ``model``); the modules
            replayed are those :func:`frozen_modules` gives for each of them.

    Yields:
        The replaying forwards (``calls`` and ``replays`` count what happened).
    """
    names = [param_names] if isinstance(param_names, str) else list(param_names)
    modules = frozen_modules(model, names[0]) if names else []
    for name in names[1:]:
        below = {id(m) for m in frozen_modules(model, name)}
        modules = [m for m in modules if id(m) in below]
    saved = [m.__dict__.get("forward") for m in modules]  # an instance-level forward, if any
    replays = [_Replay(m) for m in modules]
    for module, replay in zip(modules, replays, strict=True):
        module.forward = replay  # type: ignore[method-assign]
    try:
        yield replays
    finally:
        for module, previous in zip(modules, saved, strict=True):
            if previous is None:
                del module.forward
            else:
                module.forward = previous  # type: ignore[method-assign]
