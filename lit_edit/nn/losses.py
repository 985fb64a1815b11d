"""Losses and measures on prompt-masked, teacher-forced batches (MEND, FT, SERAC, WISE, ...).

All functions take ``labels`` laid out like ``input_ids`` (``-100`` on the prompt and on padding,
see :class:`~lit_edit.data.collate.PairCollator`) and align ``logits[:, t]`` with
``labels[:, t + 1]`` (METHODS.md §1.3 and pitfall P14).
"""

from __future__ import annotations

import torch
from torch import nn

from lit_edit.tokenization import IGNORE_INDEX


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting each label and the labels: ``[B, L-1, V]`` and ``[B, L-1]``."""
    return logits[:, :-1], labels[:, 1:]


def answer_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the positions that predict an answer token, and those tokens.

    Only those positions (a few per sequence) go through the output head: the same values as
    full logits (``masked_nll`` of them equals ``cross_entropy`` of these), for a fraction of
    the head's cost. Models without a separate head, or with final logit soft-capping, are
    run whole and their logits picked. No key/value cache is built (``use_cache=False``).

    Args:
        model: A causal LM (a peft wrapper is unwrapped for the head).
        input_ids: ``[B, L]``.
        attention_mask: ``[B, L]``.
        labels: ``[B, L]``, ``-100`` where nothing is predicted.

    Returns:
        ``[N, V]`` logits and ``[N]`` answer tokens, ``N`` the answer tokens of the batch.
    """
    target = labels[:, 1:]  # [B, L - 1]: position t predicts token t + 1
    scored = target != IGNORE_INDEX
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    if head is None or getattr(lm.config, "final_logit_softcapping", None):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[:, :-1][scored], target[scored]  # [N, V], [N]
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           use_cache=False).last_hidden_state
    return head(hidden[:, :-1][scored]), target[scored]  # hidden [B, L, H] -> [N, V]


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the answer tokens (over all answer tokens of the batch).

    Args:
        logits: ``[B, L, V]``.
        labels: ``[B, L]``.

    Returns:
        A scalar (0 when there is no answer token).
    """
    pred, target = _shift(logits, labels)
    mask = target != IGNORE_INDEX  # [B, L-1]
    logp = pred.float().log_softmax(-1)  # [B, L-1, V]
    picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)  # [B, L-1]
    return -(picked * mask).sum() / mask.sum().clamp(min=1)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row fraction of answer tokens predicted by argmax (EasyEdit's teacher-forced acc).

    Args:
        logits: ``[B, L, V]``.
        labels: ``[B, L]``.

    Returns:
        ``[B]`` accuracies (rows without answer tokens give 0).
    """
    pred, target = _shift(logits, labels)
    mask = target != IGNORE_INDEX
    hit = (pred.argmax(-1) == target) & mask
    return hit.sum(-1).float() / mask.sum(-1).clamp(min=1).float()


def locality_kl(
    base_logits: torch.Tensor, edited_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``KL(p_base ‖ p_edited)`` summed over the vocabulary, averaged over answer positions.

    Args:
        base_logits: ``[B, L, V]`` logits of the unedited model (treated as constants).
        edited_logits: ``[B, L, V]`` logits of the edited model.
        labels: ``[B, L]`` locality answer labels (only their positions are compared).

    Returns:
        A scalar (0 when there is no answer token).
    """
    base, target = _shift(base_logits.detach(), labels)
    edited, _ = _shift(edited_logits, labels)
    mask = (target != IGNORE_INDEX).float()  # [B, L-1]
    logp = base.float().log_softmax(-1)  # [B, L-1, V]
    logq = edited.float().log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # [B, L-1]
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def agreement(
    base_logits: torch.Tensor, edited_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Per-row fraction of answer positions where the two argmax predictions agree (locality).

    Args:
        base_logits: ``[B, L, V]``.
        edited_logits: ``[B, L, V]``.
        labels: ``[B, L]``.

    Returns:
        ``[B]`` agreements.
    """
    base, target = _shift(base_logits, labels)
    edited, _ = _shift(edited_logits, labels)
    mask = target != IGNORE_INDEX
    same = (base.argmax(-1) == edited.argmax(-1)) & mask
    return same.sum(-1).float() / mask.sum(-1).clamp(min=1).float()
