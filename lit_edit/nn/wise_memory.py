"""WISE's side memory around one FFN value matrix: shards, masks, clamp, router, merging.

:class:`SideMemory` hooks the value layer (``nn.Linear`` or GPT-2 ``Conv1D``, through
:func:`~lit_edit.nn.layout.matrix_layout`) **once** and keeps its whole state across edits
(METHODS.md P7): the side copy ``W'`` being edited (:attr:`SideMemory.side`, a buffer starting
at the original ``W_v``), the random gradient mask of the current shard, the saved shards (and,
in Merge mode, the merged memory), each memory's threshold ``ε`` (the least in-scope activation
distance of its edits) and the edit counter. Sharding and merging follow the edit counter only
(P10): every ``save_freq`` edits the side copy is saved as a shard and reset to ``W_v`` with a
new mask; every ``merge_freq`` edits the last ``merge_freq / save_freq`` shards are Ties-merged
(:func:`~lit_edit.nn.wise_merge.ties_merge`). Evaluating never changes the state.

**Routing** (per sequence of a batch; ``d`` = mean activation distance over its real tokens,
:mod:`~lit_edit.nn.wise_routing`, threshold ``τ = ε · act_ratio``):

* ``mode="merge"`` (WISE-Merge, the paper's default): the candidates are the merged memory and
  the side copy; if both are below ``τ`` (``ε`` the least over every edit so far) the original
  output is used, otherwise the output of the larger distance.
* ``mode="retrieve"`` (WISE-Retrieve, the peer's yaml default, P8): the side copy if its
  distance reaches its own ``τ``; then any saved memory whose distance is larger than the best
  so far and above its own ``τ`` replaces it (top-1 activation).

With no edit in effect the layer's output is returned untouched (bit-identical to the base). The
attention mask of the model's call (read by a forward pre-hook on the model) keeps padding out
of the means. In cached generation (a call on fewer tokens than its attention mask) each row
keeps the route chosen on its prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from lit_edit.nn.layout import MatrixLayout
from lit_edit.nn.wise_merge import TiesNormalisation, ties_merge
from lit_edit.nn.wise_routing import DistanceKind, sequence_distance, token_distance

Mode = Literal["merge", "retrieve"]
ORIGINAL = -1  #: route of a sequence answered by the original weights
SIDE = 0  #: route of a sequence answered by the side copy being edited


def _min(a: float | None, b: float | None) -> float | None:
    """The smaller of two optional values."""
    if a is None:
        return b
    return a if b is None else min(a, b)


class SideMemory(nn.Module):
    """The side memory of one value layer (see the module docstring).

    Args:
        layer: The value layer (``nn.Linear`` or ``Conv1D``); frozen, never changed.
        layout: Its :class:`~lit_edit.nn.layout.MatrixLayout`.
        mode: ``"merge"`` or ``"retrieve"``.
        distance: ``"activated"`` (peer) or ``"delta"`` (paper), see
            :mod:`~lit_edit.nn.wise_routing`.
        activation: The model's hidden activation (for ``"activated"``).
        act_ratio: ``τ = ε · act_ratio``.
        mask_ratio: ρ, the fraction of entries of the side copy each shard trains.
        save_freq: Edits per shard.
        merge_freq: Edits per merge (a multiple of ``save_freq``).
        density: Ties' trim density.
        ties_normalise: Ties' disjoint mean (``"weights"``: WISE's code; ``"count"``: peft's).
        norm_constraint: L∞ radius of the side copy around ``W_v``.
        seed: Seed of the gradient masks (shard ``s`` draws its mask from ``seed`` and ``s``).

    Raises:
        ValueError: on bad settings.
    """

    def __init__(
        self,
        layer: nn.Module,
        layout: MatrixLayout,
        mode: Mode = "merge",
        distance: DistanceKind = "activated",
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        act_ratio: float = 0.88,
        mask_ratio: float = 0.2,
        save_freq: int = 500,
        merge_freq: int = 1000,
        density: float = 0.53,
        ties_normalise: TiesNormalisation = "weights",
        norm_constraint: float | None = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mode not in ("merge", "retrieve"):
            raise ValueError(f"mode must be 'merge' or 'retrieve', got {mode!r}")
        if distance not in ("delta", "activated"):
            raise ValueError(f"distance must be 'delta' or 'activated', got {distance!r}")
        if distance == "activated" and activation is None:
            raise ValueError("distance 'activated' needs the model's activation function")
        if not 0.0 < mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
        if save_freq < 1 or merge_freq < save_freq or merge_freq % save_freq:
            raise ValueError(
                f"need save_freq >= 1 and merge_freq a multiple of save_freq, got save_freq "
                f"{save_freq}, merge_freq {merge_freq}"
            )
        if act_ratio <= 0:
            raise ValueError(f"act_ratio must be > 0, got {act_ratio}")
        if norm_constraint is not None and norm_constraint <= 0:
            raise ValueError(f"norm_constraint must be > 0 or None, got {norm_constraint}")
        self._layer = [layer]  # a list: not a submodule (its weights are the frozen backbone's)
        self.layout = layout
        self.mode = mode
        self.distance = distance
        self.activation = activation
        self.act_ratio = act_ratio
        self.mask_ratio = mask_ratio
        self.save_freq = save_freq
        self.merge_freq = merge_freq
        self.density = density
        self.ties_normalise = ties_normalise
        self.norm_constraint = norm_constraint
        self.seed = seed
        self.register_buffer("side", layer.weight.detach().clone())
        # the state (all of it in get_extra_state, except the side copy)
        self.edits = 0  # edits applied in total
        self.eps: float | None = None  # least in-scope distance of the current shard's edits
        self.mask = self._draw_mask(0)  # bool, the weight's layout
        self.memories: list[dict[str, Any]] = []  # {"weight", "eps"}: saved shards / memories
        self.merged: torch.Tensor | None = None  # Merge mode: the merged side memory
        self.merged_eps: float | None = None
        self.merges = 0
        self.replay: list[tuple[str, str]] = []  # (prompt, answer) of the current shard's edits
        # per call, not state
        self.editing = False
        self.last_distance: torch.Tensor | None = None  # [B, L] while editing (in the graph)
        self.last_routes: torch.Tensor | None = None  # [B] routes of the last routed call
        self._attention_mask: torch.Tensor | None = None
        self._incremental = False
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ wiring
    @property
    def layer(self) -> nn.Module:
        """The wrapped value layer."""
        return self._layer[0]

    @property
    def original(self) -> torch.Tensor:
        """``W_v``, the layer's (frozen) weight in its storage layout."""
        return self.layer.weight

    def attach(self, model: nn.Module) -> None:
        """Hook the layer (its output is routed) and the model (its attention mask is read).

        Raises:
            RuntimeError: if already attached (the layer is wrapped once).
        """
        if self._handles:
            raise RuntimeError("the side memory is already attached")
        self._handles.append(model.register_forward_pre_hook(self._read_mask, with_kwargs=True))
        self._handles.append(self.layer.register_forward_hook(self._route_hook))

    def detach_hooks(self) -> None:
        """Remove the hooks (the model is then the plain base model)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _read_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._attention_mask = mask
        self._incremental = bool(
            mask is not None and ids is not None and mask.shape[-1] > ids.shape[-1]
        )

    def _token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[B, L]`` real-token mask of the layer's input ``x`` (``[B, L, d_in]``)."""
        mask = self._attention_mask
        if mask is None or x.dim() != 3 or mask.shape[0] != x.shape[0]:
            return None
        return mask[:, -x.shape[1]:].to(x.device)

    def output(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer's output on ``x`` with ``weight`` (storage layout) instead of its own."""
        bias = self.layer.bias
        if self.layout.transposed:  # nn.Linear: [d_out, d_in]
            return nn.functional.linear(x, weight, bias)
        shape = x.shape[:-1] + (weight.shape[1],)
        flat = x.reshape(-1, x.shape[-1])  # as Conv1D computes it
        out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
        return out.view(shape)

    def _distance(self, out: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return token_distance(out, original, self.distance, self.activation)

    # ------------------------------------------------------------------ forward
    def _route_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if self.editing:
            side = self.output(self.side, x)
            self.last_distance = self._distance(side, output)  # [B, L]
            return side
        if not self.in_effect():
            self.last_routes = None
            return output
        candidates = self._candidates()  # (route, weight, threshold)
        outs = [self.output(w.to(x.device), x) for _, w, _ in candidates]
        reuse = (self._incremental and self.last_routes is not None
                 and self.last_routes.shape[0] == x.shape[0])
        if reuse:
            routes = self.last_routes
        else:
            mask = self._token_mask(x)
            dists = [sequence_distance(self._distance(o, output), mask) for o in outs]  # [B]
            routes = self._choose(candidates, dists, x.shape[0])
            self.last_routes = routes
        out = output
        for (route, _, _), o in zip(candidates, outs, strict=True):
            rows = (routes == route).to(x.device)
            if bool(rows.any()):
                out = torch.where(rows.view(-1, *([1] * (o.dim() - 1))), o, out)
        return out

    def in_effect(self) -> bool:
        """Whether any edit is in effect (otherwise the layer's output is untouched)."""
        return self.eps is not None or self.merged is not None or (
            self.mode == "retrieve" and bool(self.memories)
        )

    def _candidates(self) -> list[tuple[int, torch.Tensor, float]]:
        """``(route, weight, threshold)`` of each memory a sequence may be routed to."""
        inf = float("inf")
        out: list[tuple[int, torch.Tensor, float]] = []
        if self.mode == "merge":
            eps = _min(self.eps, self.merged_eps)
            tau = inf if eps is None else eps * self.act_ratio
            if self.eps is not None:
                out.append((SIDE, self.side, tau))
            if self.merged is not None:
                out.append((1, self.merged, tau))
            return out
        tau = inf if self.eps is None else self.eps * self.act_ratio
        out.append((SIDE, self.side, tau))
        for i, memory in enumerate(self.memories):
            out.append((i + 1, memory["weight"], memory["eps"] * self.act_ratio))
        return out

    def _choose(
        self, candidates: list[tuple[int, torch.Tensor, float]], dists: list[torch.Tensor],
        batch: int,
    ) -> torch.Tensor:
        """``[B]`` route of each sequence from the candidates' distances."""
        routes = torch.full((batch,), ORIGINAL, dtype=torch.long)
        if self.mode == "merge":
            best = torch.full((batch,), -1.0)
            for (route, _, _), d in zip(candidates, dists, strict=True):
                d = d.detach().float().cpu()
                better = d > best
                best = torch.where(better, d, best)
                routes = torch.where(better, torch.full_like(routes, route), routes)
            tau = candidates[0][2]
            return torch.where(best < tau, torch.full_like(routes, ORIGINAL), routes)
        (_, _, tau), *rest = candidates
        best = dists[0].detach().float().cpu()
        routes = torch.where(best >= tau, torch.full_like(routes, SIDE), routes)
        for (route, _, tau_i), d in zip(rest, dists[1:], strict=True):
            d = d.detach().float().cpu()
            take = (d > best) & (d > tau_i)
            routes = torch.where(take, torch.full_like(routes, route), routes)
            best = torch.where(take, d, best)
        return routes

    # ------------------------------------------------------------------ editing
    def _draw_mask(self, shard: int) -> torch.Tensor:
        """The random gradient mask of shard ``shard`` (Bernoulli(ρ) per entry, seeded)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + shard)
        shape = self.side.shape
        return (torch.rand(shape, generator=generator) < self.mask_ratio).to(self.side.device)

    def clamp_(self) -> None:
        """Keep the side copy within ``norm_constraint`` of ``W_v`` (L∞), in place."""
        if self.norm_constraint is None:
            return
        c = self.norm_constraint
        with torch.no_grad():
            w = self.original
            self.side.copy_(torch.minimum(torch.maximum(self.side, w - c), w + c))

    def finish_edit(self, in_scope: float) -> None:
        """Count an edit whose in-scope distance is ``in_scope``; save and merge on schedule."""
        self.edits += 1
        self.eps = _min(self.eps, float(in_scope))
        if self.edits % self.save_freq == 0:
            self._save_shard()
        if self.edits % self.merge_freq == 0:
            self._merge()

    def _save_shard(self) -> None:
        """Push the side copy as a shard; reset it to ``W_v`` with the next shard's mask."""
        self.memories = [*self.memories,
                         {"weight": self.side.detach().clone(), "eps": self.eps}]
        with torch.no_grad():
            self.side.copy_(self.original)
        self.eps = None
        self.replay = []
        self.mask = self._draw_mask(self.edits // self.save_freq)

    def _merge(self) -> None:
        """Ties-merge the last ``merge_freq / save_freq`` shards (see the module docstring)."""
        k = self.merge_freq // self.save_freq
        shards, keep = self.memories[-k:], self.memories[:-k]
        w0 = self.original.detach()
        vectors = [s["weight"] - w0 for s in shards]
        eps = None
        for s in shards:
            eps = _min(eps, s["eps"])
        if self.mode == "retrieve":
            merged = w0 + ties_merge(vectors, [1.0 / k] * k, self.density, self.ties_normalise)
            self.memories = [*keep, {"weight": merged, "eps": eps}]
        else:
            weights = [1.0 / k] * k
            if self.merged is not None:  # re-merge: new shards 0.4 in all, the merged memory 0.6
                vectors.append(self.merged - w0)
                weights = [0.4 / k] * k + [0.6]
            self.merged = w0 + ties_merge(vectors, weights, self.density, self.ties_normalise)
            self.merged_eps = _min(self.merged_eps, eps)
            self.memories = keep
        self.merges += 1

    # ------------------------------------------------------------------ state
    def snapshot(self) -> dict[str, Any]:
        """What :meth:`restore` needs to bring the state back exactly.

        Only the current mask's entries of the side copy are copied: outside the mask it equals
        ``W_v`` (edits change masked entries only, a reset writes ``W_v``).
        """
        state = self._state()
        state["side_values"] = self.side.detach()[self.mask].clone()
        return state

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Bring back the state of a :meth:`snapshot`."""
        self._load(snapshot)
        with torch.no_grad():
            self.side.copy_(self.original)
            self.side[self.mask] = snapshot["side_values"].to(self.side.device)

    def _state(self) -> dict[str, Any]:
        return {
            "edits": self.edits, "eps": self.eps, "mask": self.mask,
            "memories": list(self.memories), "merged": self.merged,
            "merged_eps": self.merged_eps, "merges": self.merges, "replay": list(self.replay),
        }

    def _load(self, state: dict[str, Any]) -> None:
        device = self.side.device
        self.edits = int(state["edits"])
        self.eps = state["eps"]
        self.mask = state["mask"].to(device)
        self.memories = [{"weight": m["weight"].to(device), "eps": m["eps"]}
                         for m in state["memories"]]
        self.merged = None if state["merged"] is None else state["merged"].to(device)
        self.merged_eps = state["merged_eps"]
        self.merges = int(state["merges"])
        self.replay = [(str(p), str(a)) for p, a in state.get("replay", [])]
        self.last_routes = None

    def get_extra_state(self) -> dict[str, Any]:
        """The state besides :attr:`side` (counters, ε's, mask, memories), for checkpoints."""
        state = self._state()
        state["memories"] = [dict(m) for m in self.memories]
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Load the state written by :meth:`get_extra_state`."""
        self._load(state)

    def extra_repr(self) -> str:
        """Mode, edits, memories."""
        return (f"mode={self.mode}, edits={self.edits}, memories={len(self.memories)}, "
                f"merged={self.merged is not None}")
