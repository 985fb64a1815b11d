"""Where a causal LM keeps its blocks and MLP matrices, and how each weight matrix is laid out.

A linear layer computes ``y = W x``. ``nn.Linear`` stores ``W`` as ``[d_out, d_in]``; Hugging
Face's GPT-2 ``Conv1D`` stores it transposed, ``[d_in, d_out]``. Every method that reads or writes
a weight matrix (MEND's rank-1 gradients, ROME/MEMIT's key-value updates, WISE's side memory,
FT's inner parameters) goes through :func:`matrix_layout`, which decides from the layer's type,
never from the weight's shape (a square matrix would be ambiguous).

The MLP names of each architecture are an explicit table (:func:`architectures`), keyed by the
model's ``config.model_type``; an architecture not in it fails with a clear error instead of
being guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MatrixLayout:
    """Where one weight matrix sits and how it is laid out.

    Attributes:
        name: Full parameter name, e.g. ``"transformer.h.1.mlp.c_fc.weight"``.
        d_in: Input features of the layer (width of its input ``u``).
        d_out: Output features of the layer (width of its output and of ``δ = ∂L/∂y``).
        transposed: ``True`` when the weight is stored ``[d_out, d_in]`` (``nn.Linear``),
            ``False`` when stored ``[d_in, d_out]`` (GPT-2 ``Conv1D``).
    """

    name: str
    d_in: int
    d_out: int
    transposed: bool

    @property
    def shape_key(self) -> str:
        """A key shared by matrices of the same ``(d_in, d_out)``, e.g. ``"128x512"``."""
        return f"{self.d_in}x{self.d_out}"

    def to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        """A ``[d_out, d_in]`` matrix in this weight's storage layout."""
        return matrix if self.transposed else matrix.transpose(0, 1)

    def from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """This weight (or a tensor in its layout) as a ``[d_out, d_in]`` matrix."""
        return weight if self.transposed else weight.transpose(0, 1)


def matrix_layout(name: str, module: nn.Module) -> MatrixLayout:
    """Describe the weight of an ``nn.Linear`` or GPT-2 ``Conv1D`` layer.

    Args:
        name: The weight's full parameter name (``<module path>.weight``).
        module: The layer owning it.

    Returns:
        Its shape and layout.

    Raises:
        TypeError: for a layer that is neither ``nn.Linear`` nor ``Conv1D``.
    """
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return MatrixLayout(name, module.in_features, module.out_features, transposed=True)
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape  # Conv1D weight: [d_in, d_out]
        return MatrixLayout(name, int(d_in), int(d_out), transposed=False)
    raise TypeError(
        f"{name!r} belongs to a {type(module).__name__}: only nn.Linear and GPT-2 Conv1D weight "
        "matrices can be edited"
    )


def outer_sum(u: torch.Tensor, delta: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``Σ_t δ_t u_tᵀ`` in a weight's layout (the weight gradient of ``y = W u``).

    Args:
        u: ``[N, d_in]`` layer inputs.
        delta: ``[N, d_out]`` output gradients (or any output-side factors).
        transposed: Weight stored ``[d_out, d_in]`` (``nn.Linear``) when ``True``.

    Returns:
        ``[d_out, d_in]`` if ``transposed`` else ``[d_in, d_out]``.
    """
    if transposed:
        return delta.transpose(0, 1) @ u  # [d_out, N] @ [N, d_in]
    return u.transpose(0, 1) @ delta  # [d_in, N] @ [N, d_out]


@dataclass(frozen=True)
class Architecture:
    """Module names of the transformer blocks and MLPs of one architecture.

    Attributes:
        blocks: Path of the ``ModuleList`` of blocks, e.g. ``"transformer.h"``.
        mlp_in: The MLP's input matrices inside a block, in order (e.g. ``("mlp.c_fc",)``;
            gated MLPs: ``("mlp.gate_proj", "mlp.up_proj")``).
        mlp_out: The MLP's output (value) matrix inside a block, e.g. ``"mlp.c_proj"``.
        mlp: The MLP module inside a block.
        attention: The attention module inside a block (e.g. ``"attn"``, ``"self_attn"``).
    """

    blocks: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    mlp: str = "mlp"
    attention: str = "attn"


def architectures() -> dict[str, Architecture]:
    """The known architectures by ``config.model_type``."""
    gated = Architecture("model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
                         attention="self_attn")
    return {
        "gpt2": Architecture("transformer.h", ("mlp.c_fc",), "mlp.c_proj"),
        "gptj": Architecture("transformer.h", ("mlp.fc_in",), "mlp.fc_out"),
        "gpt_neox": Architecture("gpt_neox.layers", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h",
                                 attention="attention"),
        "llama": gated,
        "mistral": gated,
        "qwen2": gated,
    }


def architecture_of(model: nn.Module) -> Architecture:
    """The :class:`Architecture` of a Hugging Face model (a peft wrapper is looked through).

    Raises:
        ValueError: for a model type not in :func:`architectures` (name the parameters
            explicitly then).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    known = architectures()
    if model_type not in known:
        raise ValueError(
            f"unknown architecture {model_type!r} of {type(model).__name__} (known: "
            f"{sorted(known)}): name the edited parameters explicitly"
        )
    return known[model_type]


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks of ``model``."""
    return int(model.config.num_hidden_layers)


def _layer_indices(model: nn.Module, layers: list[int] | None) -> list[int]:
    """Block indices in ``[0, n)`` (negative ones count from the end; out of range: an error)."""
    n = num_layers(model)
    if layers is None:
        return list(range(n))
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(
            f"block index {bad[0]} is out of range for {type(model).__name__} with {n} blocks "
            f"(use 0..{n - 1}, or -{n}..-1 from the end)"
        )
    return [i % n for i in layers]


def mlp_parameter_names(model: nn.Module, layers: list[int] | None = None) -> list[str]:
    """Names of the MLP weight matrices of the given blocks, inputs first, then the output.

    Args:
        model: A model of a known architecture (:func:`architectures`).
        layers: Block indices (negative counts from the end); default: all blocks.

    Returns:
        E.g. ``["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"]``.
    """
    arch = architecture_of(model)
    return [
        f"{arch.blocks}.{i}.{part}.weight"
        for i in _layer_indices(model, layers)
        for part in (*arch.mlp_in, arch.mlp_out)
    ]


def mlp_out_name(model: nn.Module, layer: int) -> str:
    """Module name of the MLP output (value) matrix of block ``layer``.

    E.g. ``"transformer.h.1.mlp.c_proj"`` (GPT-2) or ``"model.layers.1.mlp.down_proj"`` (LLaMA).
    """
    arch = architecture_of(model)
    return f"{arch.blocks}.{_layer_indices(model, [layer])[0]}.{arch.mlp_out}"


def block_name(model: nn.Module, layer: int) -> str:
    """Module name of transformer block ``layer``, e.g. ``"transformer.h.1"``."""
    arch = architecture_of(model)
    return f"{arch.blocks}.{_layer_indices(model, [layer])[0]}"
