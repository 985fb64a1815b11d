"""MEND's learned parts (Mitchell et al., ICLR 2022): plain ``torch.nn`` modules, no Lightning.

MEND edits a weight matrix ``W`` of a linear layer ``y = W x`` from the rank-1 factors of its
gradient: for one token ``t`` with layer input ``u_t`` and gradient ``δ_t = ∂L/∂y_t`` of the loss
with respect to the layer's output, ``∇_W L = Σ_t δ_t u_tᵀ``. A small network (the *gradient
transform*) maps each pair ``(u_t, δ_t)`` to ``(u′_t, δ′_t)``; the edit is built from the
pseudo-gradient ``ĝ = Σ_t δ′_t u′_tᵀ`` with a learned per-matrix step size ``α``.

Sign convention (METHODS.md P15): lit_edit applies ``W′ = W − α·ĝ`` (``descent=True``, the
paper's gradient-descent form), so with an identity transform and ``α > 0`` an edit is a plain
gradient step on the edit loss. ``descent=False`` gives the original code's and EasyEdit's
``W′ = W + α·ĝ`` (whose step sizes turn negative during training).

Layouts (:mod:`lit_edit.nn.layout`): ``nn.Linear`` stores ``W`` as ``[d_out, d_in]``
(``ĝ = Σ δ uᵀ``); Hugging Face's GPT-2 ``Conv1D`` stores it transposed, ``[d_in, d_out]``
(``ĝ = Σ u δᵀ``). Factors are always ``u: [N, d_in]`` and ``δ: [N, d_out]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from lit_edit.nn.layout import MatrixLayout, outer_sum
from lit_edit.nn.row_deltas import LowRank


class RunningNorm(nn.Module):
    """Running per-feature mean and variance; normalises ``x`` to ``(x − μ) / (σ + eps)``.

    The statistics are updated (batched Welford/Chan update, equal to MEND's one-row-at-a-time
    Welford update) only by :meth:`update`, which :class:`GradientTransform` calls in training
    mode; they are buffers, so checkpoints carry them. Until two rows have been seen the
    normalisation is the identity.

    Args:
        dim: Number of features.
        eps: Added to the standard deviation.
    """

    def __init__(self, dim: int, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x`` (``[N, dim]``) into the statistics.

        In a multi-process run (``torch.distributed`` initialised) every process folds in the
        rows of every process, in rank order, so the statistics stay the same on all ranks and
        count every row (DDP would otherwise broadcast rank 0's buffers and drop the others').
        """
        x = x.to(self.mean.dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for n, mean, m2 in _gathered_moments(x):
                self._fold(n, mean, m2)
        elif x.shape[0]:
            mean = x.mean(0)  # [dim]
            self._fold(x.shape[0], mean, (x - mean).square().sum(0))

    def _fold(self, n_new: int, mean_new: torch.Tensor, m2_new: torch.Tensor) -> None:
        """Chan's merge of ``n_new`` rows with mean ``mean_new`` and ``m2_new`` into the state."""
        if n_new == 0:
            return
        n_old = self.count.item()
        total = n_old + n_new
        diff = mean_new - self.mean
        self.mean.add_(diff * (n_new / total))
        self.m2.add_(m2_new + diff.square() * (n_old * n_new / total))
        self.count.fill_(total)

    @property
    def std(self) -> torch.Tensor:
        """Unbiased per-feature standard deviation (ones before two rows were seen)."""
        if self.count.item() < 2:
            return torch.ones_like(self.m2)
        return (self.m2 / (self.count - 1)).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (``[N, dim]``) with the current statistics."""
        if self.count.item() < 2:
            return x
        return (x - self.mean) / (self.std + self.eps)


def _gathered_moments(x: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(rows, mean, m2)`` of ``x`` (``[N, dim]``) on every process, in rank order."""
    n = x.shape[0]
    mean = x.mean(0) if n else x.new_zeros(x.shape[1])  # [dim]
    m2 = (x - mean).square().sum(0) if n else x.new_zeros(x.shape[1])  # [dim]
    mine = torch.cat([x.new_tensor([float(n)]), mean, m2])  # [1 + 2 dim]
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    dim = x.shape[1]
    return [(int(r[0].item()), r[1 : 1 + dim], r[1 + dim :]) for r in rows]


class LowRankResidual(nn.Module):
    """One layer of MEND's ``IDMLP``: ``z + relu((U V z + b) · scale[m] + shift[m])``.

    ``U`` (``[dim, r]``) starts at zero, so the layer is exactly the identity at
    initialisation; ``V`` (``[r, dim]``) starts ``N(0, 1)``; the per-mode ``scale``/``shift``
    (one row per edited matrix sharing this layer) start at one and zero. With ``relu=False``
    the residual branch is linear (no clamp).

    Args:
        dim: Width of ``z``.
        rank: Rank ``r`` of ``U V`` (capped at ``dim``).
        n_modes: Number of modes (matrices sharing the layer).
        relu: Clamp the residual branch at zero.
    """

    def __init__(self, dim: int, rank: int, n_modes: int = 1, relu: bool = True) -> None:
        super().__init__()
        self.relu = relu
        r = min(rank, dim)
        self.u = nn.Parameter(torch.zeros(dim, r))
        self.v = nn.Parameter(torch.randn(r, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, z: torch.Tensor, mode: int = 0) -> torch.Tensor:
        """Apply the layer to ``z`` (``[N, dim]``) for matrix ``mode``."""
        h = (z @ self.v.T) @ self.u.T + self.bias  # [N, r] -> [N, dim]
        h = h * self.mode_scale[mode] + self.mode_shift[mode]
        return (h.clamp(min=0) if self.relu else h) + z


class GradientTransform(nn.Module):
    """MEND's editor network for one (d_in, d_out) shape: ``(u, δ) ↦ (u′, δ′)``.

    The normalised factors are concatenated (``[N, d_in + d_out]``), passed through
    ``n_hidden + 1`` :class:`LowRankResidual` layers, and split back; the outputs are not
    de-normalised (as in MEND). At initialisation the network is the identity on the normalised
    factors, and the exact identity while no statistics were collected.

    MEND's code clamps the residual branch of every layer, the output layer's included (its
    per-layer ``relu`` flag is ignored), so the transform can only add non-negative amounts to
    each coordinate and never shrink one. ``output_relu=False`` makes the output layer's branch
    linear, as that flag intended.

    Args:
        d_in: Width of ``u`` (layer input).
        d_out: Width of ``δ`` (layer output gradient).
        n_modes: Number of edited matrices sharing the transform (each gets its own per-layer
            scale and shift).
        rank: Rank of each layer's low-rank map (MEND: 1920; capped at ``d_in + d_out``).
        n_hidden: Hidden layers (MEND: 1, i.e. two layers).
        norm: Normalise ``u`` and ``δ`` with running statistics (MEND: on).
        output_relu: Clamp the output layer's branch too (MEND's code: on).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        n_modes: int = 1,
        rank: int = 1920,
        n_hidden: int = 1,
        norm: bool = True,
        output_relu: bool = True,
    ) -> None:
        super().__init__()
        if n_hidden < 0:
            raise ValueError(f"n_hidden must be >= 0, got {n_hidden}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.d_in = d_in
        self.d_out = d_out
        self.norm = norm
        self.norm_u = RunningNorm(d_in)
        self.norm_delta = RunningNorm(d_out)
        self.layers = nn.ModuleList(
            LowRankResidual(d_in + d_out, rank, n_modes, relu=output_relu or i < n_hidden)
            for i in range(n_hidden + 1)
        )

    def forward(
        self, u: torch.Tensor, delta: torch.Tensor, mode: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform factors; in training mode, first fold them into the running statistics.

        Args:
            u: ``[N, d_in]`` layer inputs (rows of padding already dropped).
            delta: ``[N, d_out]`` output gradients.
            mode: Index of the edited matrix among those sharing this transform.

        Returns:
            ``(u′, δ′)`` with the shapes of ``(u, δ)``, in float32.
        """
        u, delta = u.float(), delta.float()
        if self.norm:
            if self.training:
                self.norm_u.update(u)
                self.norm_delta.update(delta)
            u, delta = self.norm_u(u), self.norm_delta(delta)
        z = torch.cat([u, delta], dim=-1)  # [N, d_in + d_out]
        for layer in self.layers:
            z = layer(z, mode)
        return z[:, : self.d_in], z[:, self.d_in :]


class MENDNetwork(nn.Module):
    """All MEND parameters for a list of edited matrices: transforms and per-matrix step sizes.

    With ``shared=True`` (MEND's default) one :class:`GradientTransform` serves all matrices of
    one (d_in, d_out) shape, each matrix being a *mode* of it; otherwise every matrix has its own.
    The update of matrix ``i`` is ``−α_i·ĝ_i`` (``descent=True``) or ``+α_i·ĝ_i``, see the module
    docstring for the sign convention.

    Args:
        matrices: The edited matrices, in a fixed order (the order of :attr:`edit_lrs`).
        rank: Rank of the transforms' low-rank layers.
        n_hidden: Hidden layers per transform.
        norm: Running normalisation of the factors.
        shared: One transform per shape (``True``) or per matrix.
        edit_lr: Initial value of every step size ``α_i``.
        descent: Update sign: ``W − α·ĝ`` (``True``) or ``W + α·ĝ`` (``False``).
        output_relu: Clamp the transforms' output layer (see :class:`GradientTransform`).

    Attributes:
        transforms: Transform key (``"<d_in>x<d_out>"`` or the matrix index) → transform.
        edit_lrs: ``[n_matrices]`` learned step sizes.
    """

    def __init__(
        self,
        matrices: Sequence[MatrixLayout],
        rank: int = 1920,
        n_hidden: int = 1,
        norm: bool = True,
        shared: bool = True,
        edit_lr: float = 1e-4,
        descent: bool = True,
        output_relu: bool = True,
    ) -> None:
        super().__init__()
        if not matrices:
            raise ValueError("MENDNetwork needs at least one edited matrix")
        self.matrices = list(matrices)
        self.descent = descent
        keys = [m.shape_key if shared else str(i) for i, m in enumerate(self.matrices)]
        self.keys = keys
        self.modes = [keys[:i].count(k) for i, k in enumerate(keys)]
        self.transforms = nn.ModuleDict()
        for key, m in zip(keys, self.matrices, strict=True):
            if key not in self.transforms:
                self.transforms[key] = GradientTransform(
                    m.d_in,
                    m.d_out,
                    keys.count(key),
                    rank=rank,
                    n_hidden=n_hidden,
                    norm=norm,
                    output_relu=output_relu,
                )
        self.edit_lrs = nn.Parameter(torch.full((len(self.matrices),), float(edit_lr)))

    def pseudo_gradient(self, index: int, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``ĝ`` of matrix ``index`` from its factors (``u: [N, d_in]``, ``δ: [N, d_out]``)."""
        m = self.matrices[index]
        u2, d2 = self.transforms[self.keys[index]](u, delta, self.modes[index])
        return outer_sum(u2, d2, m.transposed)

    def grouped(
        self, factors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n_groups: int
    ) -> list[LowRank]:
        """The update of every matrix for each of ``n_groups`` independent edits, factored.

        The transform acts on each factor row alone, so transforming the rows of several edits
        together and summing ``δ′ u′ᵀ`` per edit gives each edit's own update. It is returned as
        its factors (rank: the most rows of one edit, zero rows padding the others), never
        multiplied out.

        Args:
            factors: One ``(u [N_i, d_in], δ [N_i, d_out], groups [N_i])`` per matrix, in order;
                ``groups[t]`` in ``[0, n_groups)`` is the edit row ``t`` belongs to.
            n_groups: Number of edits.

        Returns:
            One float32 :class:`~lit_edit.nn.row_deltas.LowRank` per matrix (``left [K, r,
            d_in]`` the transformed inputs, ``right [K, r, d_out]`` the transformed output
            gradients times the signed step size).
        """
        if len(factors) != len(self.matrices):
            raise ValueError(
                f"expected factors for {len(self.matrices)} matrices, got {len(factors)}"
            )
        sign = -1.0 if self.descent else 1.0
        out = []
        for i, (u, d, groups) in enumerate(factors):
            u2, d2 = self.transforms[self.keys[i]](u, d, self.modes[i])  # [N, d_in], [N, d_out]
            counts = torch.bincount(groups, minlength=n_groups)  # [K] rows of each edit
            rank = max(int(counts.max()) if counts.numel() else 0, 1)
            left = u2.new_zeros(n_groups, rank, u2.shape[1])  # [K, r, d_in]
            right = d2.new_zeros(n_groups, rank, d2.shape[1])  # [K, r, d_out]
            for k in range(n_groups):
                rows = groups == k
                left[k, : int(counts[k])] = u2[rows]
                right[k, : int(counts[k])] = d2[rows]
            out.append(LowRank(left, sign * self.edit_lrs[i] * right))
        return out

    def forward(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """The additive update of every matrix: ``W′_i = W_i + update_i``.

        Args:
            factors: One ``(u [N_i, d_in], δ [N_i, d_out])`` pair per matrix, in order.

        Returns:
            One float32 update per matrix, in the weight's layout.
        """
        if len(factors) != len(self.matrices):
            raise ValueError(
                f"expected factors for {len(self.matrices)} matrices, got {len(factors)}"
            )
        sign = -1.0 if self.descent else 1.0
        return [
            sign * self.edit_lrs[i] * self.pseudo_gradient(i, u, d)
            for i, (u, d) in enumerate(factors)
        ]
