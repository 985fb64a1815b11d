"""The model's own view of a question: its hidden state at the question's last token.

Used by LTE's learned scope (:mod:`lit_edit.nn.scope`): a question phrased with the subject's
alias has a hidden state close to those of the subject's questions, though no sentence encoder
links the two texts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lit_edit.tokenization import pad_sequences, position_ids_from_mask


class QuestionStates:
    """``hidden_states[layer]`` of a causal LM at each question's last token, cached by text.

    The cache holds until :meth:`clear` (call it whenever the weights change).

    Args:
        model: The causal LM (called with ``output_hidden_states=True``).
        encode: A question's token ids as the model reads it (e.g. chat-wrapped, truncated).
        pad_id: Padding token id (batches are left padded, with explicit position ids).
        layer: Index into ``hidden_states`` (0: the embeddings).
        batch_size: Questions per forward.
    """

    def __init__(
        self,
        model: nn.Module,
        encode: Callable[[str], list[int]],
        pad_id: int,
        layer: int,
        batch_size: int = 64,
    ) -> None:
        self.model = model
        self.encode = encode
        self.pad_id = pad_id
        self.layer = layer
        self.batch_size = batch_size
        self._cache: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        """Forget every cached state."""
        self._cache.clear()

    def __call__(self, questions: Sequence[str]) -> torch.Tensor:
        """``[N, H]`` float32 CPU states of the questions (the model in eval mode meanwhile)."""
        missing = [q for q in dict.fromkeys(questions) if q not in self._cache]
        if missing:
            device = next(self.model.parameters()).device
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                for i in range(0, len(missing), self.batch_size):
                    chunk = missing[i : i + self.batch_size]
                    ids, mask = pad_sequences([self.encode(q) for q in chunk], self.pad_id, "left")
                    out = self.model(
                        input_ids=ids.to(device),  # [B, L]
                        attention_mask=mask.to(device),
                        position_ids=position_ids_from_mask(mask).to(device),
                        output_hidden_states=True,
                    )
                    states = out.hidden_states[self.layer][:, -1].float().cpu()  # [B, H]
                    self._cache.update(zip(chunk, states, strict=True))
            self.model.train(was_training)
        return torch.stack([self._cache[q] for q in questions])
