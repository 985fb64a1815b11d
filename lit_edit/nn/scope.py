"""A learned scope for an edit memory: is a query about a retrieved edit? (SERAC-style).

A retriever ranks edits by the cosine similarity of sentence embeddings, which cannot tell
"X lives in" (another relation of the edited subject: out of scope) from "the country X was born
in" (a consequence of the edit "X was born in": in scope), or "Y was born in" (another subject)
from a rephrase. :class:`ScopeHead` is a small classifier over a pair of embeddings (the edit
question's, the query's), trained on the training edit records like SERAC's scope classifier
(METHODS.md §3): in-scope pairs are a record's edit question with its own question, its
rephrases and its portability questions that name the record's subject; out-of-scope pairs are
the record's locality questions and other records' in-scope questions. Portability questions
that do not name the subject (an alias, a two-hop question through another entity) are left out
of training: nothing in their text links them to the edit, and training on them teaches surface
artefacts instead (see ``scope_pairs``).

The pair features are symmetric and subject-agnostic (for unit vectors ``e``, ``q``)::

    phi(e, q) = [e * q, |e - q|, <e, q>]          # [2 D + 1]
    p(in scope) = sigmoid(w2 . gelu(W1 phi + b1) + b2)

The weights are plain tensors saved as the module's extra state, so the head takes its input
size from the encoder at training time and loads from a checkpoint without knowing it before.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_edit.records import EditRecord

#: A second view of a pair: ``(edit_states, query_states)``, ``[..., H]`` each.
StatePair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ScopeSettings:
    """A learned scope in front of an edit memory, and how it is trained.

    At each validation of ``fit`` (on the weights of that moment) a :class:`ScopeHead` is
    trained on pairs of the training edit records (:func:`scope_pairs`) and saved with the
    checkpoint; at editing time it scores each query's ``candidates`` nearest edits and only
    those with an in-scope probability of at least ``threshold`` apply.

    Args:
        threshold: Least in-scope probability of a retrieved edit.
        candidates: Nearest edits (by cosine) the head scores per query.
        steps: Training steps of the head (batches of 256 pairs).
        layer: Also give the head the edited model's hidden state of each question's last
            token, ``hidden_states[layer]`` (0: the embeddings): the model's own view of what
            a question is about, which can link a question naming the subject's alias to the
            edit (``None``: sentence embeddings only).
        positives: In-scope training questions: ``"named"`` (portability questions that name
            the subject) or ``"all"`` (every portability question; use with ``layer``).
        negatives: Other records' in-scope questions per record as out-of-scope pairs.
        hard_negatives: Per record, the in-scope questions of this many other records whose
            edit questions are nearest by sentence embedding, as out-of-scope pairs.
    """

    threshold: float = 0.5
    candidates: int = 8
    steps: int = 2000
    layer: int | None = None
    positives: Literal["named", "all"] = "named"
    negatives: int = 1
    hard_negatives: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"scope.threshold must be in [0, 1], got {self.threshold}")
        if self.positives not in ("named", "all"):
            raise ValueError(f"scope.positives must be 'named' or 'all', got {self.positives!r}")
        if self.candidates < 1 or self.steps < 1 or min(self.negatives, self.hard_negatives) < 0:
            raise ValueError(
                "scope.candidates and scope.steps must be >= 1, scope.negatives and "
                f"scope.hard_negatives >= 0, got {self.candidates}, {self.steps}, "
                f"{self.negatives}, {self.hard_negatives}"
            )


@dataclass(frozen=True)
class ScopePair:
    """One training pair of the scope classifier.

    Attributes:
        edit: The edit question (the memory key's text).
        query: A question asked of the edited model.
        in_scope: Whether the edit applies to the query.
    """

    edit: str
    query: str
    in_scope: bool


def in_scope_questions(record: EditRecord, named_only: bool = True) -> list[str]:
    """The questions of a record its edit is trained to reach.

    Args:
        record: An edit record.
        named_only: Keep only the portability questions whose text names the record's subject
            (all of them when the record has no subject); ``False``: every portability question.

    Returns:
        The edit question, its rephrases and the kept portability questions.
    """
    questions = [record.prompt, *record.rephrase_prompts]
    for group in record.portability.values():
        for pair in group:
            if not (named_only and record.subject) or record.subject in pair.prompt:
                questions.append(pair.prompt)
    return list(dict.fromkeys(questions))


def scope_pairs(
    records: Sequence[EditRecord],
    seed: int = 0,
    random_negatives: int = 1,
    named_only: bool = True,
    neighbours: Sequence[Sequence[int]] | None = None,
) -> list[ScopePair]:
    """Training pairs of the scope classifier from edit records.

    Args:
        records: Edit records (``prompt``, rephrases, portability, locality, ``subject``).
        seed: Seed of the other records drawn as random negatives.
        random_negatives: Per record, in-scope questions of other records (drawn at random)
            paired with this record's edit question as out-of-scope pairs.
        named_only: See :func:`in_scope_questions` (``False`` needs features that can link a
            question to the edit without naming its subject, e.g. the model's hidden states:
            otherwise the classifier learns the surface of such questions).
        neighbours: Per record, positions of other records whose in-scope questions are all
            added as out-of-scope pairs (hard negatives: e.g. the records whose edit questions
            are nearest, the edits a retriever will offer for this one's questions).

    Returns:
        For each record: its in-scope pairs (:func:`in_scope_questions`), then its locality
        questions, ``random_negatives`` other records' questions and its neighbours' questions
        as out-of-scope pairs.
    """
    rng = random.Random(seed)
    scoped = [in_scope_questions(r, named_only) for r in records]
    pairs: list[ScopePair] = []
    for i, record in enumerate(records):
        pairs += [ScopePair(record.prompt, q, True) for q in scoped[i]]
        pairs += [
            ScopePair(record.prompt, p.prompt, False)
            for group in record.locality.values()
            for p in group
        ]
        if len(records) > 1:
            for _ in range(random_negatives):
                j = rng.randrange(len(records) - 1)
                j += j >= i  # another record
                pairs.append(ScopePair(record.prompt, rng.choice(scoped[j]), False))
        for j in neighbours[i] if neighbours is not None else ():
            if j == i:
                raise ValueError(f"record {i} is listed among its own neighbours")
            pairs += [ScopePair(record.prompt, q, False) for q in scoped[j]]
    return pairs


class ScopeHead(nn.Module):
    """Probability that a query is in the scope of an edit, from their two embeddings.

    A two-layer MLP over :meth:`features`. Untrained until :meth:`fit`; its weights are the
    module's extra state (part of ``state_dict()`` and Lightning checkpoints) and never require
    gradients outside :meth:`fit`.

    Args:
        hidden: Width of the hidden layer.
    """

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.hidden = hidden
        self.weights: dict[str, torch.Tensor] = {}

    @property
    def trained(self) -> bool:
        """Whether the head has weights (fitted, or loaded from a checkpoint)."""
        return bool(self.weights)

    @staticmethod
    def features(
        edits: torch.Tensor, queries: torch.Tensor, states: StatePair | None = None
    ) -> torch.Tensor:
        """``[..., F]`` pair features: ``[e * q, |e - q|, <e, q>]`` of unit vectors, per view.

        Args:
            edits: ``[..., D]`` edit-question embeddings (normalised here).
            queries: ``[..., D]`` query embeddings, same shape (normalised here).
            states: Optionally a second view: ``(edit_states, query_states)``, ``[..., H]``
                each (e.g. the model's hidden states of the two questions); its features follow
                the first view's (``F = 2 D + 1 + 2 H + 1``).
        """
        views = [(edits, queries), *([states] if states is not None else [])]
        out = []
        for a, b in views:
            e = F.normalize(a.float(), dim=-1)
            q = F.normalize(b.float(), dim=-1)
            prod = e * q  # [..., D]
            out += [prod, (e - q).abs(), prod.sum(-1, keepdim=True)]
        return torch.cat(out, dim=-1)

    def _logits(self, features: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = F.gelu(F.linear(features, weights["w1"], weights["b1"]))  # [..., H]
        return F.linear(hidden, weights["w2"], weights["b2"]).squeeze(-1)  # [...]

    def forward(
        self, edits: torch.Tensor, queries: torch.Tensor, states: StatePair | None = None
    ) -> torch.Tensor:
        """In-scope probabilities ``[...]`` of ``[..., D]`` edit and query embeddings.

        Args:
            edits: Edit-question embeddings.
            queries: Query embeddings.
            states: The second view, when the head was trained with one (see :meth:`features`).

        Raises:
            RuntimeError: if the head is not trained.
            ValueError: if the inputs do not give the features the head was trained on.
        """
        if not self.trained:
            raise RuntimeError(
                "the scope head is not trained: fit the editor with its scope enabled first "
                "(e.g. LTEEditor(scope=True) and `train.py fit`), or load such a checkpoint"
            )
        features = self.features(edits, queries, states)
        n_in = self.weights["w1"].shape[1]
        if features.shape[-1] != n_in:
            raise ValueError(
                f"the scope head was trained on {n_in} pair features, these inputs give "
                f"{features.shape[-1]} (embedding size {edits.shape[-1]}, "
                f"{'no state' if states is None else 'state size ' + str(states[0].shape[-1])})"
            )
        with torch.no_grad():
            return torch.sigmoid(self._logits(features, self.weights))

    def fit(
        self,
        edits: torch.Tensor,
        queries: torch.Tensor,
        labels: torch.Tensor,
        states: StatePair | None = None,
        steps: int = 2000,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        seed: int = 0,
    ) -> float:
        """Train the head from scratch on labelled pairs (binary cross-entropy, AdamW).

        Deterministic for a given ``seed``; the global random state is left untouched.

        Args:
            edits: ``[N, D]`` edit-question embeddings.
            queries: ``[N, D]`` query embeddings.
            labels: ``[N]`` booleans, ``True`` for in-scope pairs.
            states: Optional second view, ``[N, H]`` each (see :meth:`features`).
            steps: Optimizer steps.
            batch_size: Pairs per step (sampled with replacement).
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            seed: Seed of the initialisation and of the batches.

        Returns:
            The mean loss over the last 100 steps.
        """
        if not (edits.shape == queries.shape and edits.dim() == 2 and len(labels) == len(edits)):
            raise ValueError(
                f"need [N, D] edits and queries and N labels, got {tuple(edits.shape)}, "
                f"{tuple(queries.shape)}, {len(labels)}"
            )
        if len(labels) == 0:
            raise ValueError("no scope pairs to train on")
        gen = torch.Generator().manual_seed(seed)
        features = self.features(edits, queries, states).detach()  # [N, F]
        target = labels.float()
        n_in = features.shape[1]
        bound1, bound2 = n_in**-0.5, self.hidden**-0.5
        weights = {  # nn.Linear's default uniform initialisation, from the seeded generator
            "w1": (torch.rand(self.hidden, n_in, generator=gen) * 2 - 1) * bound1,
            "b1": (torch.rand(self.hidden, generator=gen) * 2 - 1) * bound1,
            "w2": (torch.rand(1, self.hidden, generator=gen) * 2 - 1) * bound2,
            "b2": (torch.rand(1, generator=gen) * 2 - 1) * bound2,
        }
        for w in weights.values():
            w.requires_grad_(True)
        optimizer = torch.optim.AdamW(weights.values(), lr=lr, weight_decay=weight_decay)
        losses: list[float] = []
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(len(target), (batch_size,), generator=gen)
                loss = F.binary_cross_entropy_with_logits(
                    self._logits(features[idx], weights), target[idx]
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        self.weights = {k: w.detach().requires_grad_(False) for k, w in weights.items()}
        tail = losses[-100:]
        return sum(tail) / max(len(tail), 1)

    def get_extra_state(self) -> dict[str, Any]:
        """The weights (empty when untrained), saved in ``state_dict()``."""
        return {"hidden": self.hidden, "weights": {k: w.clone() for k, w in self.weights.items()}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the weights written by :meth:`get_extra_state`."""
        self.hidden = int(state["hidden"])
        self.weights = {k: w.detach().clone().float() for k, w in state["weights"].items()}

    def extra_repr(self) -> str:
        """Width and whether it is trained (shown in the module's repr)."""
        return f"hidden={self.hidden}, trained={self.trained}"
