"""The edit memory of LTE's retrieval and SERAC: question embeddings and their facts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class EditMemory(nn.Module):
    """Keys (question embeddings, normalised by default) and values (facts) of the inserted edits.

    Keys are stored in ``key_dtype`` (float16 by default: half the memory traffic of a scan, the
    cost of a single query on a CPU; ``"int8"``: a quarter, each key scaled by its largest
    absolute value / 127) in a buffer that grows by doubling, so inserting is amortised ``O(D)``.
    A search scores every key (a few queries: matrix-vector products in ``key_dtype``, int8 keys
    through torch's int8-weight matrix product with a bfloat16 query; more: float32 matrix
    products over chunks of keys), keeps the best ``k + rerank`` candidates and re-scores those
    in float32, so the returned order and scores are float32-exact up to the keys' rounding. The
    content is the module's *extra state*: it is part of ``state_dict()`` and of Lightning
    checkpoints, whatever its size.

    Args:
        key_dtype: Storage dtype of the keys: ``"float16"``, ``"bfloat16"``, ``"float32"`` or
            ``"int8"``.
        rerank: Extra candidates re-scored in float32 after the first pass.
        normalise: Store unit keys and search by cosine (LTE); ``False`` stores the keys as
            given and :meth:`search` ranks by plain dot product (SERAC's classifiers read the
            raw keys through :attr:`keys` and apply their own distance).
    """

    def __init__(
        self, key_dtype: str = "float16", rerank: int = 16, normalise: bool = True
    ) -> None:
        super().__init__()
        dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                  "int8": torch.int8}
        if key_dtype not in dtypes:
            raise ValueError(f"key_dtype must be one of {sorted(dtypes)}, got {key_dtype!r}")
        if rerank < 0:
            raise ValueError(f"rerank must be >= 0, got {rerank}")
        self.key_dtype = key_dtype
        self.rerank = rerank
        self.normalise = normalise
        self._dtype = dtypes[key_dtype]
        self._keys = torch.zeros(0, 0, dtype=self._dtype)  # [capacity, D]
        self._scales = torch.ones(0)  # [capacity] per-key scale (int8 keys; ones otherwise)
        self._sq_norms = torch.zeros(0)  # [capacity] float32 squared norms of the stored keys
        self._size = 0
        self.questions: list[str] = []
        self.facts: list[str] = []

    def __len__(self) -> int:
        return self._size

    @property
    def dim(self) -> int | None:
        """Key dimension (``None`` until the first insertion)."""
        return self._keys.shape[1] or None

    @property
    def keys(self) -> torch.Tensor:
        """``[N, D]`` the stored (normalised) keys; float32 for int8 storage (dequantised)."""
        if self._dtype == torch.int8:
            return self._keys[: self._size].float() * self._scales[: self._size, None]
        return self._keys[: self._size]

    @property
    def sq_norms(self) -> torch.Tensor:
        """``[N]`` float32 squared norms of :attr:`keys` (computed once, at insertion)."""
        return self._sq_norms[: self._size]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` float32 keys at the positions ``index`` (a tensor of any shape)."""
        rows = self._keys[index].float()
        return rows * self._scales[index][..., None] if self._dtype == torch.int8 else rows

    def add(self, keys: torch.Tensor, questions: Sequence[str], facts: Sequence[str]) -> None:
        """Append edits.

        Args:
            keys: ``[N, D]`` embeddings of the edit questions (normalised here, if
                :attr:`normalise`).
            questions: The ``N`` questions (kept for inspection).
            facts: The ``N`` fact sentences (the values).

        Raises:
            ValueError: on mismatched lengths or a key dimension other than the memory's.
        """
        if keys.dim() != 2 or not (keys.shape[0] == len(questions) == len(facts)):
            raise ValueError(
                f"need [N, D] keys and N questions and facts, got keys {tuple(keys.shape)}, "
                f"{len(questions)} questions, {len(facts)} facts"
            )
        n, d = keys.shape
        if self.dim is not None and d != self.dim:
            raise ValueError(f"key dimension {d} differs from the memory's {self.dim}")
        needed = self._size + n
        if needed > self._keys.shape[0] or self._keys.shape[1] != d:
            capacity = max(needed, 2 * self._keys.shape[0], 64)
            grown = torch.zeros(capacity, d, dtype=self._dtype)
            scales = torch.ones(capacity)
            sq_norms = torch.zeros(capacity)
            if self._size:
                grown[: self._size] = self._keys[: self._size]
                scales[: self._size] = self._scales[: self._size]
                sq_norms[: self._size] = self._sq_norms[: self._size]
            self._keys, self._scales, self._sq_norms = grown, scales, sq_norms
        unit = keys.detach().float().cpu()  # [N, D]
        if self.normalise:
            unit = F.normalize(unit, dim=-1)
        if self._dtype == torch.int8:
            scale = unit.abs().amax(dim=-1).clamp_min(1e-12) / 127  # [N]
            self._scales[self._size : needed] = scale
            unit = torch.round(unit / scale[:, None])
        self._keys[self._size : needed] = unit.to(self._dtype)
        stored = self._keys[self._size : needed].float()  # [N, D] as a scan reads them
        if self._dtype == torch.int8:
            stored = stored * self._scales[self._size : needed, None]
        self._sq_norms[self._size : needed] = stored.pow(2).sum(-1)
        self._size = needed
        self.questions.extend(questions)
        self.facts.extend(facts)

    def truncate(self, size: int) -> None:
        """Forget every edit after the first ``size`` (undo of later insertions)."""
        if not 0 <= size <= self._size:
            raise ValueError(f"cannot truncate a memory of {self._size} edits to {size}")
        self._size = size
        del self.questions[size:]
        del self.facts[size:]

    def clear(self) -> None:
        """Forget every edit."""
        self.truncate(0)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` keys of each query by cosine (by dot product without :attr:`normalise`).

        Args:
            queries: ``[Q, D]`` query embeddings (normalised here, if :attr:`normalise`).
            k: Results per query (fewer when the memory holds fewer edits).

        Returns:
            ``(scores, indices)``, both ``[Q, min(k, N)]``, best first; scores are float32.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = self._size
        q = queries.detach().float().cpu()  # [Q, D]
        if self.normalise:
            q = F.normalize(q, dim=-1)
        if n == 0:
            empty = torch.zeros(q.shape[0], 0)
            return empty, empty.long()
        keys = self._keys[:n]  # [N, D]
        if self._dtype == torch.int8:  # int8 keys, bfloat16 queries, per-key scales
            first = torch._weight_int8pack_mm(
                q.bfloat16(), keys, self._scales[:n].bfloat16()
            )  # [Q, N]
        elif q.shape[0] <= 4 or self._dtype == torch.float32:  # memory-bound: scan in key dtype
            qk = q.to(self._dtype)
            first = torch.stack([torch.mv(keys, row) for row in qk]) if q.shape[0] <= 4 else (
                qk @ keys.T
            )  # [Q, N]
        else:  # compute-bound: float32 matrix products over chunks of keys
            first = torch.cat(
                [q @ keys[i : i + 16384].float().T for i in range(0, n, 16384)], dim=1
            )  # [Q, N]
        c = min(n, k + self.rerank)
        cand = first.float().topk(c, dim=-1).indices  # [Q, c]
        exact = torch.einsum("qd,qcd->qc", q, self.rows(cand))  # [Q, c]
        kk = min(k, n)
        scores, order = exact.topk(kk, dim=-1)  # [Q, k]
        return scores, cand.gather(-1, order)

    def get_extra_state(self) -> dict[str, Any]:
        """The content, saved in ``state_dict()``: keys as float32 (as stored), questions, facts.

        int8 keys are also saved as stored, with their scales, so that they load bit-identically.
        """
        state = {  # an empty memory has one state, whatever it held before
            "keys": self.keys.float().clone() if self._size else torch.zeros(0, 0),
            "questions": list(self.questions),
            "facts": list(self.facts),
        }
        if self._dtype == torch.int8:
            state["int8_keys"] = self._keys[: self._size].clone()
            state["int8_scales"] = self._scales[: self._size].clone()
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the content written by :meth:`get_extra_state`."""
        self._keys = torch.zeros(0, 0, dtype=self._dtype)
        self._scales = torch.ones(0)
        self._sq_norms = torch.zeros(0)
        self._size = 0
        self.questions, self.facts = [], []
        if not len(state["facts"]):
            return
        self.add(state["keys"], state["questions"], state["facts"])
        if self._dtype == torch.int8 and "int8_keys" in state:
            self._keys[: self._size] = state["int8_keys"]
            self._scales[: self._size] = state["int8_scales"]

    def extra_repr(self) -> str:
        """Size, dimension and key dtype (shown in the module's repr)."""
        return f"size={self._size}, dim={self.dim}, key_dtype={self.key_dtype}"
