"""Training the learned scope of an edit memory (:class:`~lit_edit.nn.scope.ScopeHead`).

:class:`ScopeTrainer` builds the head's pairs from training and validation edit records once
(with their sentence embeddings), and trains the head from scratch whenever asked, on the
current hidden states of the model when it has a second view, leaving every global random state
as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_edit.nn.encoders import Encoder
from lit_edit.nn.scope import ScopeHead, ScopePair, scope_pairs
from lit_edit.random_state import preserved_random_state
from lit_edit.records import EditRecord


@dataclass
class ScopeSet:
    """Pairs of the scope head with their sentence embeddings.

    Attributes:
        pairs: The pairs.
        embeddings: ``[N, D]`` embeddings of the pairs' edit questions and of their queries.
    """

    pairs: list[ScopePair]
    embeddings: tuple[torch.Tensor, torch.Tensor]

    @property
    def labels(self) -> torch.Tensor:
        """``[N]`` booleans: in scope."""
        return torch.tensor([p.in_scope for p in self.pairs], dtype=torch.bool)


class ScopeTrainer:
    """Trains a scope head on pairs from edit records.

    Args:
        head: The head to train.
        encoder: The retriever's sentence encoder.
        states: The second view of a question, or ``None`` (e.g.
            :class:`~lit_edit.nn.lte_states.QuestionStates`).
        named_only: In-scope portability questions only when they name the subject (see
            :func:`~lit_edit.nn.scope.scope_pairs`).
        negatives: Random other records' questions per record, as out-of-scope pairs.
        hard_negatives: Per record, every in-scope question of this many other records whose
            edit questions are nearest by sentence embedding, as out-of-scope pairs.
        steps: Training steps (batches of 256 pairs).
        threshold: In-scope probability threshold (for the validation accuracies).
    """

    def __init__(
        self,
        head: ScopeHead,
        encoder: Encoder,
        states: Callable[[Sequence[str]], torch.Tensor] | None,
        named_only: bool,
        negatives: int,
        hard_negatives: int,
        steps: int,
        threshold: float,
    ) -> None:
        self.head = head
        self.encoder = encoder
        self.states = states
        self.named_only = named_only
        self.negatives = negatives
        self.hard_negatives = hard_negatives
        self.steps = steps
        self.threshold = threshold
        self._sets: tuple[ScopeSet, ScopeSet] | None = None

    def prepare(self, train: Sequence[EditRecord], val: Sequence[EditRecord]) -> None:
        """Build the training and validation pairs and their embeddings (once).

        Raises:
            ValueError: without training records.
        """
        if self._sets is not None:
            return
        if not train:
            raise ValueError(
                "scope=True trains the scope head on edit records: use an LTEDataModule whose "
                "`edits` has a train split"
            )
        neighbours = None
        if self.hard_negatives:
            keys = F.normalize(self.encoder.encode([r.prompt for r in train]), dim=-1)  # [R, D]
            sims = keys @ keys.T  # [R, R]
            sims.fill_diagonal_(-2.0)
            k = min(self.hard_negatives, len(train) - 1)
            neighbours = sims.topk(k, dim=-1).indices.tolist()
        train_pairs = scope_pairs(
            train, random_negatives=self.negatives, named_only=self.named_only,
            neighbours=neighbours,
        )
        val_pairs = scope_pairs(val, named_only=self.named_only)
        self._sets = (
            ScopeSet(train_pairs, self._embeddings(train_pairs)),
            ScopeSet(val_pairs, self._embeddings(val_pairs)),
        )

    def fit(self) -> str:
        """Train the head from scratch (after :meth:`prepare`), global random states untouched.

        Returns:
            A line with the final loss and the validation accuracies, in and out of scope.
        """
        if self._sets is None:
            raise RuntimeError("call prepare() before fit()")
        with preserved_random_state():
            return self._fit(*self._sets)

    def _fit(self, train: ScopeSet, val: ScopeSet) -> str:
        loss = self.head.fit(
            *train.embeddings, train.labels, states=self._states(train.pairs), steps=self.steps
        )
        message = f"scope head: {len(train.pairs)} pairs, loss {loss:.4f}"
        if val.pairs:
            prob = self.head(*val.embeddings, self._states(val.pairs))  # [N]
            truth = val.labels
            hit = (prob >= self.threshold) == truth
            message += (
                f"; validation ({len(val.pairs)} pairs): in scope "
                f"{hit[truth].float().mean():.3f}, out of scope {hit[~truth].float().mean():.3f}"
            )
        return message

    def _embeddings(self, pairs: list[ScopePair]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, D]`` sentence embeddings of the pairs' edit questions and queries."""
        if not pairs:
            return torch.zeros(0, 0), torch.zeros(0, 0)
        texts = list(dict.fromkeys(t for p in pairs for t in (p.edit, p.query)))
        rows = torch.cat([
            self.encoder.encode(texts[i : i + 512]) for i in range(0, len(texts), 512)
        ])  # [T, D]
        index = {t: i for i, t in enumerate(texts)}
        return rows[[index[p.edit] for p in pairs]], rows[[index[p.query] for p in pairs]]

    def _states(self, pairs: list[ScopePair]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The second view of the pairs' two questions (``None`` without one)."""
        if self.states is None or not pairs:
            return None
        return self.states([p.edit for p in pairs]), self.states([p.query for p in pairs])
