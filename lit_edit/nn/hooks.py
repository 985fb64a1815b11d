"""Forward hooks on chosen layers: their inputs, outputs and output gradients (rank-1 factors)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.func import functional_call


class LayerCapture:
    """Record the input ``u`` and the output of each given layer during a forward pass.

    Use as a context manager around one forward pass; the hooks are removed on exit, whatever
    happens inside. Afterwards :meth:`inputs` and :meth:`outputs` give what each layer saw and
    produced (e.g. the keys of a locate-then-edit method are inputs of an MLP output matrix), and
    :meth:`factors` differentiates a loss with respect to the recorded outputs (``δ = ∂L/∂y``;
    no weight gradient is formed) and returns the rank-1 factors of every layer's weight
    gradient with batch and sequence flattened into one token axis and padding rows dropped.

    Args:
        modules: Layer name → layer (``nn.Linear`` or ``Conv1D``), in the order wanted.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            """Keep the layer's input and output of this forward pass."""
            if name in self._outputs:
                raise RuntimeError(f"layer {name!r} ran twice in one captured forward pass")
            self._inputs[name] = args[0].detach()
            self._outputs[name] = output

        return hook

    def __enter__(self) -> LayerCapture:
        self._inputs.clear()
        self._outputs.clear()
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def inputs(self, name: str) -> torch.Tensor:
        """The (detached) input of layer ``name`` in the captured pass, e.g. ``[B, L, d_in]``."""
        if name not in self._inputs:
            raise KeyError(f"layer {name!r} did not run in the captured forward pass")
        return self._inputs[name]

    def outputs(self, name: str) -> torch.Tensor:
        """The output of layer ``name`` in the captured pass (in the graph if it needs grad)."""
        if name not in self._outputs:
            raise KeyError(f"layer {name!r} did not run in the captured forward pass")
        return self._outputs[name]

    def factors(self, loss: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The factors of every layer for ``loss``, in the order of ``modules``.

        Args:
            loss: A scalar computed from the captured forward pass.

        Returns:
            ``(u [N, d_in], δ [N, d_out])`` per layer, rows where ``u`` or ``δ`` is all zero
            (padding, positions after the last label) dropped. The sum ``Σ_t δ_t u_tᵀ`` is the
            layer's true weight gradient.

        Raises:
            RuntimeError: if a layer did not run, or its output does not depend on trainable
                tensors (nothing to differentiate).
        """
        return [(u, d) for u, d, _ in self.factors_by_row(loss)]

    def factors_by_row(
        self, loss: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Like :meth:`factors`, with the batch row each factor row comes from.

        Returns:
            ``(u [N, d_in], δ [N, d_out], rows [N])`` per layer: ``rows[t]`` is the batch index
            of token ``t`` (to split the gradient of a batch of independent edits by edit).
        """
        missing = [n for n in self.modules if n not in self._outputs]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the captured forward pass")
        names = list(self.modules)
        outputs = [self._outputs[n] for n in names]
        if not all(o.requires_grad for o in outputs):
            raise RuntimeError("captured outputs do not require grad: run the forward with grad")
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        result = []
        for name, out, grad in zip(names, outputs, grads, strict=True):
            x = self._inputs[name]  # [B, L, d_in]
            u = x.reshape(-1, x.shape[-1])  # [B*L, d_in]
            if grad is None:
                grad = torch.zeros_like(out)
            delta = grad.detach().reshape(-1, out.shape[-1])  # [B*L, d_out]
            keep = (u != 0).any(-1) & (delta != 0).any(-1)  # [B*L]
            rows = torch.arange(x.shape[0], device=u.device).repeat_interleave(
                x.shape[1] if x.dim() == 3 else 1
            )  # [B*L]
            result.append((u[keep], delta[keep], rows[keep]))
        self._outputs.clear()
        self._inputs.clear()
        return result


def capture_factors(
    model: nn.Module,
    names: Sequence[str],
    modules: Sequence[nn.Module],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    by_row: bool = False,
    **inputs: torch.Tensor,
) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
    """Run ``model`` once with hooks on ``modules`` and return the factors of ``loss_fn``.

    The model's own parameters are neither changed nor asked for gradients: the weights of
    ``names`` are swapped (with :func:`torch.func.functional_call`) for detached copies that
    require grad, so the layers' outputs enter the autograd graph.

    Args:
        model: A Hugging Face causal LM.
        names: Weight names of the edited matrices (``<module>.weight``).
        modules: The layers owning them, same order.
        loss_fn: Maps the ``[B, L, V]`` logits to a scalar loss.
        by_row: Also return each factor row's batch row (:meth:`LayerCapture.factors_by_row`).
        **inputs: Model inputs (``input_ids``, ``attention_mask``).

    Returns:
        ``(factors, loss)``: one ``(u, δ)`` pair per matrix (see :meth:`LayerCapture.factors`;
        ``(u, δ, rows)`` with ``by_row``) and the detached loss.
    """
    params = dict(model.named_parameters())
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    with torch.enable_grad(), LayerCapture(dict(zip(names, modules, strict=True))) as capture:
        logits = functional_call(model, leaves, args=(), kwargs=inputs).logits  # [B, L, V]
        loss = loss_fn(logits)
        factors = capture.factors_by_row(loss) if by_row else capture.factors(loss)
    return factors, loss.detach()
