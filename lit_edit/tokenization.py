"""Tokenization of (prompt, answer) pairs and padding, shared by collate functions and the scorer.

The convention (METHODS.md §1.2, pitfalls P3 and P19): a pair is the text ``prompt + " " + answer``
tokenized once, with the tokenizer's own special tokens at the start (e.g. LLaMA's BOS); the answer
tokens are exactly the tokens of that text that cover the answer, so they equal the tokens the model
sees, and no special token is ever an answer label. The tokenizer is never mutated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

#: Label of a position that is not scored (prompt, padding): ignored by every loss.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one (prompt, answer) pair.

    Attributes:
        prompt_ids: Tokens of the prompt, with the tokenizer's leading special tokens.
        answer_ids: Tokens of ``" " + answer`` as they occur in the joined text (no specials).
    """

    prompt_ids: list[int]
    answer_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        """The whole sequence: prompt then answer tokens."""
        return self.prompt_ids + self.answer_ids


def join_pair(prompt: str, answer: str) -> str:
    """Join a prompt and its answer the way the field does: ``prompt + " " + answer``."""
    return f"{prompt} {answer}"


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> EncodedPair:
    """Tokenize ``prompt + " " + answer`` once and split it into prompt and answer tokens.

    A token is an answer token when its character span ends after the prompt (so a token that
    straddles the boundary belongs to the answer). Trailing special tokens (an EOS some tokenizers
    append) are dropped.

    Args:
        tokenizer: A Hugging Face tokenizer; fast tokenizers use character offsets, slow ones
            fall back to a prefix comparison.
        prompt: The conditioning text.
        answer: The answer text (without leading space).

    Returns:
        The prompt and answer token ids.

    Raises:
        ValueError: if the answer produces no token or the split cannot be determined.
    """
    return encode_pairs(tokenizer, [(prompt, answer)])[0]


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> list[EncodedPair]:
    """:func:`encode_pair` for many ``(prompt, answer)`` pairs, with one tokenizer call.

    Fast tokenizers encode the whole list at once (in Rust), about ten times faster than one
    call per pair; the result is identical to :func:`encode_pair` on each pair.

    Args:
        tokenizer: A Hugging Face tokenizer (read only).
        pairs: ``(prompt, answer)`` texts.

    Returns:
        One :class:`EncodedPair` per pair, in order.

    Raises:
        ValueError: if an answer produces no token or a split cannot be determined.
    """
    if not pairs:
        return []
    texts = [join_pair(prompt, answer) for prompt, answer in pairs]
    if not tokenizer.is_fast:
        return [_encode_slow(tokenizer, prompt, answer) for prompt, answer in pairs]
    # the Rust tokenizer directly: the same ids and offsets as tokenizer(texts, ...) without
    # building a Python BatchEncoding (which costs more than the tokenization itself)
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=True)
    special = set(tokenizer.all_special_ids)
    return [
        _split_at(prompt, answer, list(e.ids), list(e.offsets), special)
        for (prompt, answer), e in zip(pairs, encodings, strict=True)
    ]


def _split_at(
    prompt: str,
    answer: str,
    ids: list[int],
    offsets: list[tuple[int, int]],
    special: set[int],
) -> EncodedPair:
    """Split the tokens of a joined pair where the character spans pass the prompt's end."""
    cut = len(prompt)
    # drop trailing special tokens (e.g. an appended EOS)
    while ids and ids[-1] in special and tuple(offsets[-1]) == (0, 0):
        ids, offsets = ids[:-1], offsets[:-1]
    first_answer = len(ids)
    for i, (start, end) in enumerate(offsets):
        is_special = ids[i] in special and (start, end) == (0, 0)
        if not is_special and end > cut:
            first_answer = i
            break
    if first_answer == len(ids):
        raise ValueError(f"answer {answer!r} of prompt {prompt!r} produced no tokens")
    return EncodedPair(prompt_ids=ids[:first_answer], answer_ids=ids[first_answer:])


def _encode_slow(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> EncodedPair:
    """Split a pair with a slow tokenizer: the prompt's own tokens must prefix the joined text's."""
    text = join_pair(prompt, answer)
    full = tokenizer(text, add_special_tokens=True)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if full[: len(head)] != head:
        raise ValueError(
            f"cannot split {text!r}: the prompt's tokens are not a prefix of the joined text's "
            "tokens with this slow tokenizer; use a fast tokenizer"
        )
    if len(full) == len(head):
        raise ValueError(f"answer {answer!r} of prompt {prompt!r} produced no tokens")
    return EncodedPair(prompt_ids=list(head), answer_ids=list(full[len(head) :]))


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Return the tokenizer's pad id, falling back to EOS (the field's convention for GPT-2/LLaMA).

    Raises:
        ValueError: if the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    pad_value: int,
    padding_side: str,
    length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad integer sequences into a tensor.

    Args:
        sequences: ``B`` lists of ids.
        pad_value: Value written into padding positions (a pad id, or -100 for labels).
        padding_side: ``"left"`` or ``"right"``.
        length: Total length; defaults to the longest sequence.

    Returns:
        ``(values, mask)``, both ``[B, L]``; ``mask`` is 1 on real tokens, 0 on padding.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max((len(s) for s in sequences), default=0) if length is None else length
    values = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n > width:
            raise ValueError(f"sequence of length {n} does not fit in length {width}")
        if n == 0:
            continue
        sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
        values[row, sl] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, sl] = 1
    return values, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row scores as if unpadded.

    Args:
        attention_mask: ``[B, L]`` with 1 on real tokens.

    Returns:
        ``[B, L]`` position ids (0 on padding positions).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def stack_right_padded(
    batches: Sequence[dict[str, torch.Tensor]], pad_id: int
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Stack right-padded ``input_ids``/``attention_mask``/``labels`` batches into one.

    Args:
        batches: Right-padded batches (e.g. from :class:`~lit_edit.data.collate.PairCollator`).
        pad_id: Token id written into new padding.

    Returns:
        The stacked batch (``[sum B_i, max L_i]``) and the row count of each input batch.
    """
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for key, value in fill.items():
        parts = [
            torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=value)
            for b in batches
        ]  # each [B_i, width]
        out[key] = torch.cat(parts, dim=0)
    return out, [b["input_ids"].shape[0] for b in batches]
