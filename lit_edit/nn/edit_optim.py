"""Edit-time optimisation: a few gradient steps on chosen tensors, with the usual constraints.

FT-L/FT-M fine-tune an MLP matrix on the edit, WISE trains a masked side copy of one, ROME and
MEMIT optimise a value vector: each is a short loop of "loss, backward, step, constrain" on a
handful of tensors, with an early stop. :func:`optimise` is that loop, once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch


def optimise(
    params: Sequence[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    optimizer: Literal["adam", "sgd"] = "adam",
    weight_decay: float = 0.0,
    stop_below: float | None = None,
    stop_change: float | None = None,
    grad_masks: Sequence[torch.Tensor | None] | None = None,
    linf_radius: float | None = None,
    project: Callable[[], None] | None = None,
) -> list[float]:
    """Run up to ``steps`` optimizer steps on ``params`` (in place) to lower ``loss_fn()``.

    Each step: zero the gradients, compute the loss, stop early if asked, backward, mask the
    gradients, step, then constrain (L∞ clamp around the starting values, then ``project``).
    ``params`` require grad only inside the loop (their flags and gradients are restored and
    cleared after it); the loop runs with grad enabled whatever the caller's mode.

    **K problems at once.** When ``loss_fn`` returns a vector ``[K]`` (one loss per
    independent problem) every param must have a leading dimension ``K`` whose slice ``k``
    only affects loss ``k``: the loop then solves the K problems together, each exactly as it
    would be alone (Adam and SGD are elementwise, and the gradient of ``Σ_k L_k`` with respect
    to slice ``k`` is that of ``L_k``): a problem whose loss meets the stop rule is frozen
    (excluded from the sum, its slices restored after every later step) and the loop ends when
    all have stopped. The returned losses are then lists of K values.

    Args:
        params: Leaf tensors to optimise (parameters or plain tensors).
        loss_fn: Computes the scalar loss from the current ``params``.
        steps: Most optimizer steps.
        lr: Learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (plain, no momentum).
        weight_decay: The optimizer's weight decay.
        stop_below: Stop before stepping once the loss is below this value.
        stop_change: With ``stop_below``, stop only when also the loss changed by at most this
            much since the previous step (WISE's rule: ``|ΔL| ≤ 1e-4`` and ``L ≤ 0.02``).
        grad_masks: One mask per param (or ``None`` for no mask), multiplied into its gradient
            after backward (WISE's random gradient masks).
        linf_radius: Keep every entry within this distance of its value before the loop
            (EasyEdit's ``norm_constraint``).
        project: Called (under ``no_grad``) after each step, e.g. to rescale a vector to a
            norm bound.

    Returns:
        The loss of every step taken (the last one included when it triggered the stop); with
        a vector loss, one list of K values per step.

    Raises:
        ValueError: on an unknown optimizer or a mask list of the wrong length.
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if grad_masks is not None and len(grad_masks) != len(params):
        raise ValueError(f"{len(grad_masks)} gradient masks for {len(params)} tensors")
    params = list(params)
    # the L∞ box around the starting values, [lo, hi] per param (one clamp pass per step)
    bounds = ([(p.detach() - linf_radius, p.detach() + linf_radius) for p in params]
              if linf_radius is not None else None)
    flags = [p.requires_grad for p in params]
    losses: list = []
    frozen: list[torch.Tensor] | None = None  # K problems: values of the stopped slices
    stopped: torch.Tensor | None = None  # [K] bool
    with torch.inference_mode(False), torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        make = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
        # foreach: the multi-tensor update (bit-identical to the per-tensor loop torch
        # picks on the CPU, a few times faster on large or stacked tensors)
        opt = make(params, lr=lr, weight_decay=weight_decay, foreach=True)
        try:
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn()
                if loss.dim() == 1:  # K independent problems
                    values = loss.detach()
                    if stopped is None:
                        stopped = torch.zeros(values.shape[0], dtype=torch.bool)
                        frozen = [p.detach().clone() for p in params]
                    previous = torch.tensor(losses[-1]) if losses else None
                    losses.append(values.tolist())
                    if stop_below is not None:
                        now = values.cpu() < stop_below
                        if stop_change is not None:
                            if previous is None:
                                now = torch.zeros_like(now)
                            else:
                                now &= (previous - values.cpu()).abs() <= stop_change
                        newly = now & ~stopped
                        with torch.no_grad():
                            for p, f in zip(params, frozen, strict=True):
                                rows = newly.to(p.device)
                                f[rows] = p.detach()[rows]
                        stopped |= now
                    if bool(stopped.all()):
                        break
                    loss = loss[~stopped.to(loss.device)].sum()
                    loss.backward()
                    _step(opt, params, grad_masks, bounds, project)
                    with torch.no_grad():
                        for p, f in zip(params, frozen, strict=True):
                            rows = stopped.to(p.device)
                            p[rows] = f[rows]
                    continue
                value = loss.item()
                previous = losses[-1] if losses else None
                losses.append(value)
                if stop_below is not None and value < stop_below and (
                    stop_change is None
                    or (previous is not None and abs(previous - value) <= stop_change)
                ):
                    break
                loss.backward()
                _step(opt, params, grad_masks, bounds, project)
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
                p.grad = None
    return losses


def _step(
    opt: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    grad_masks: Sequence[torch.Tensor | None] | None,
    bounds: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
    project: Callable[[], None] | None,
) -> None:
    """Mask the gradients, step, then clamp into ``bounds`` (``(lo, hi)`` per param) and project."""
    if grad_masks is not None:
        for p, mask in zip(params, grad_masks, strict=True):
            if mask is not None and p.grad is not None:
                p.grad.mul_(mask)
    opt.step()
    with torch.no_grad():
        if bounds is not None:
            for p, (lo, hi) in zip(params, bounds, strict=True):
                p.clamp_(lo, hi)  # = min(max(p, p0 - c), p0 + c), in place
        if project is not None:
            project()
