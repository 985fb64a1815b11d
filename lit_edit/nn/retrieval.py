"""Edit memory with embeddings: LTE's retrieval-based inference (METHODS.md §5.5).

An edit is stored as (key = embedding of the edit question, value = the fact sentence). A query
is embedded with the same sentence encoder and matched by normalised dot product (cosine):

    score(q, i) = <q / |q|, k_i / |k_i|>,   top-k over i

with no similarity threshold by default (the paper has none: every query, out-of-scope ones
included, gets its top-k facts, and the aligned model learns to ignore irrelevant ones); an optional
threshold drops facts scoring below it.

Three parts, plain torch (no Lightning):

* :class:`Encoder` — anything with ``encode(list[str]) -> Tensor [N, D]``;
  :class:`SentenceEncoder` wraps sentence-transformers (lazy import), :class:`HashingEncoder` is a
  dependency-free character n-gram encoder for tests and benchmarks (both in
  :mod:`lit_edit.nn.encoders`, re-exported here);
* :class:`EditMemory` (:mod:`lit_edit.nn.edit_memory`, re-exported here) — the keys and values,
  an ``nn.Module`` whose content saves and loads with
  the module's ``state_dict`` (so with a Lightning checkpoint);
* :class:`Retriever` — an encoder and a memory: insert edits, retrieve facts for queries;
  optionally a learned scope (:class:`~lit_edit.nn.scope.ScopeHead`) decides which of the
  nearest edits apply to a query.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_edit.nn.edit_memory import EditMemory
from lit_edit.nn.encoders import (
    DEFAULT_ENCODER,
    PAPER_ENCODER,
    Encoder,
    HashingEncoder,
    SentenceEncoder,
    load_encoder,
)
from lit_edit.nn.scope import ScopeHead

__all__ = [
    "DEFAULT_ENCODER",
    "PAPER_ENCODER",
    "EditMemory",
    "Encoder",
    "HashingEncoder",
    "Retrieved",
    "Retriever",
    "SentenceEncoder",
    "load_encoder",
]

@dataclass(frozen=True)
class Retrieved:
    """One retrieved edit.

    Attributes:
        index: Position of the edit in the memory.
        fact: The fact sentence.
        score: Cosine similarity between the query and the edit question.
        in_scope: The scope head's probability that the edit applies (``None`` without one).
    """

    index: int
    fact: str
    score: float
    in_scope: float | None = None


class Retriever:
    """Inserts edits into an :class:`EditMemory` and retrieves facts for queries.

    Query embeddings are cached (``cache_size`` most recent texts), so scoring, generating and
    measuring hit rates on the same prompts embeds each of them once.

    With a ``scope`` head, each query's ``candidates`` nearest edits (by cosine) are scored by
    the head (with ``states``, also its ``candidates`` nearest by the cosine of the states); those
    with an in-scope probability of at least ``scope_threshold`` (and a cosine of at least
    ``threshold``, if set) are returned, most probable first.

    Args:
        encoder: The sentence encoder (keys and queries).
        memory: The memory (a new one when ``None``).
        top_k: Facts retrieved per query (the paper's inference uses 1).
        threshold: Drop facts whose similarity is below this (``None``: keep all, the paper).
        cache_size: Query embeddings kept.
        scope: A trained scope classifier (``None``: none, the paper).
        scope_threshold: Least in-scope probability of a returned fact.
        candidates: Nearest edits the scope head scores per query (at least ``top_k``).
        states: A second view of questions for the scope head, ``texts -> [N, H]`` (e.g. the
            model's hidden states), applied to the candidates' edit questions and the queries;
            ``None`` when the head was trained without one.
    """

    def __init__(
        self,
        encoder: Encoder,
        memory: EditMemory | None = None,
        top_k: int = 1,
        threshold: float | None = None,
        cache_size: int = 8192,
        scope: ScopeHead | None = None,
        scope_threshold: float = 0.5,
        candidates: int = 8,
        states: Callable[[Sequence[str]], torch.Tensor] | None = None,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        if not 0.0 <= scope_threshold <= 1.0:
            raise ValueError(f"scope_threshold must be in [0, 1], got {scope_threshold}")
        self.encoder = encoder
        self.memory = memory if memory is not None else EditMemory()
        self.top_k = top_k
        self.threshold = threshold
        self.cache_size = cache_size
        self.scope = scope
        self.scope_threshold = scope_threshold
        self.candidates = candidates
        self.states = states
        self._states_of: list[str] = []  # the memory questions whose states are cached
        self._state_rows = torch.zeros(0, 0)  # [len(_states_of), H]
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` embeddings of ``texts`` (cached)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for text, emb in zip(missing, self.encoder.encode(missing), strict=True):
                self._cache[text] = emb
        out = torch.stack([self._cache[t] for t in texts]) if texts else torch.zeros(0, 0)
        for text in texts:
            self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def forget_states(self) -> None:
        """Drop the kept states of the memory's questions (call when :attr:`states` changes)."""
        self._states_of, self._state_rows = [], torch.zeros(0, 0)

    def _edit_states(self) -> torch.Tensor:
        """``[N, H]`` :attr:`states` of the memory's edit questions (kept for the next call)."""
        assert self.states is not None
        questions = self.memory.questions
        n = len(self._states_of)
        if n > len(questions) or self._states_of != questions[:n]:  # truncated or replaced
            self._states_of, self._state_rows, n = [], torch.zeros(0, 0), 0
        if n < len(questions):
            new = self.states(questions[n:]).float()  # [N - n, H]
            self._state_rows = torch.cat([self._state_rows, new]) if n else new
            self._states_of = list(questions)
        return self._state_rows

    def insert(self, questions: Sequence[str], facts: Sequence[str]) -> int:
        """Insert edits in bulk (one encoder call).

        Args:
            questions: Edit questions (the keys are their embeddings).
            facts: The facts (values), one per question.

        Returns:
            The memory size before the insertion (truncate to it to undo).
        """
        size = len(self.memory)
        if questions:
            self.memory.add(self.embed(questions), questions, facts)
        return size

    def retrieve(self, queries: Sequence[str], k: int | None = None) -> list[list[Retrieved]]:
        """The facts of the top-``k`` edits for each query (best first).

        Args:
            queries: Query texts.
            k: Facts per query (default :attr:`top_k`).

        Returns:
            Per query, up to ``k`` retrieved edits (none when the memory is empty, or below the
            thresholds).
        """
        if not queries:
            return []
        if len(self.memory) == 0:
            return [[] for _ in queries]
        k = k or self.top_k
        embedded = self.embed(queries)  # [Q, D]
        if self.scope is None:
            scores, indices = self.memory.search(embedded, k)
            probs = [[None] * scores.shape[1]] * scores.shape[0]
        else:
            scores, indices = self.memory.search(embedded, max(k, self.candidates))  # [Q, C]
            views = None
            if self.states is not None:
                query_states = self.states(list(queries))  # [Q, H]
                edit_states = self._edit_states()  # [N, H]
                near = F.normalize(query_states, dim=-1) @ F.normalize(edit_states, dim=-1).T
                extra = near.topk(min(max(k, self.candidates), len(self.memory))).indices
                indices = torch.cat([indices, extra], dim=1)  # [Q, C + C']
                rows = edit_states[indices]  # [Q, C + C', H]
                views = (rows, query_states[:, None, :].expand_as(rows))
            keys = self.memory.rows(indices)  # [Q, C(+C'), D]
            unit = F.normalize(embedded.float(), dim=-1)  # [Q, D]
            scores = torch.einsum("qd,qcd->qc", unit, F.normalize(keys, dim=-1))
            probs = self.scope(keys, embedded[:, None, :].expand_as(keys), views).tolist()
        out = []
        for row_s, row_i, row_p in zip(scores.tolist(), indices.tolist(), probs, strict=True):
            seen: set[int] = set()
            found = []
            for s, i, p in zip(row_s, row_i, row_p, strict=True):
                if i in seen:
                    continue
                seen.add(i)
                if (self.threshold is None or s >= self.threshold) and (
                    p is None or p >= self.scope_threshold
                ):
                    found.append(Retrieved(i, self.memory.facts[i], s, p))
            if self.scope is not None:
                found.sort(key=lambda r: -r.in_scope)  # stable: ties keep the cosine order
            out.append(found[:k])
        return out
