"""Collate functions: (prompt, answer) pairs and edit records into padded, prompt-masked tensors.

Conventions (METHODS.md §1.2, pitfalls P3/P19): a pair is tokenized once as
``prompt + " " + answer`` (:func:`~lit_edit.tokenization.encode_pair`); ``labels`` hold the answer
tokens and ``-100`` on the prompt and on padding. The padding side is always an explicit argument:
it is never read from, nor written to, the tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from lit_edit.records import DataFileError, EditRecord, QAPair
from lit_edit.tokenization import (
    IGNORE_INDEX,
    EncodedPair,
    encode_pair,
    pad_sequences,
    pad_token_id,
)


def collate_records(batch: Sequence[EditRecord]) -> list[EditRecord]:
    """DataLoader ``collate_fn`` that keeps a batch as a plain list of records.

    Args:
        batch: The records the sampler picked.

    Returns:
        The same records as a list (methods tokenize them in ``on_before_batch_transfer``).
    """
    return list(batch)


class PairCollator:
    """Tokenize :class:`~lit_edit.records.QAPair` s into a padded batch with prompt-masked labels.

    Example, right padding, pairs ("The capital of France is", "Paris") and ("Rome is in",
    "Italy") with one token per word::

        input_ids      = [[The, capital, of, France, is,  Paris], [Rome, is, in, Italy, pad, pad]]
        attention_mask = [[1,   1,       1,  1,      1,   1    ], [1,    1,  1,  1,     0,   0  ]]
        labels         = [[-100,-100,  -100, -100, -100,  Paris], [-100,-100,-100,Italy,-100,-100]]

    Args:
        tokenizer: A Hugging Face tokenizer (fast ones split prompt and answer by offsets).
        padding_side: ``"left"`` or ``"right"``; required, never taken from the tokenizer.
        max_length: Longest allowed sequence. Longer pairs lose prompt tokens from the left
            (leading special tokens such as BOS are kept; the answer is never truncated); each
            truncated pair is counted in :attr:`truncated`. ``None``: no limit.

    Attributes:
        truncated: Number of pairs whose prompt was truncated so far (in this process).
        known: Encodings of pairs tokenized before (``(prompt, answer)`` → the untruncated
            :class:`~lit_edit.tokenization.EncodedPair`), used instead of the tokenizer: the
            ``datasets`` backend's cached token ids of the current batch
            (:mod:`lit_edit.data.arrow_tokens`). Empty by default.
        recorded: When a list, every encoding the tokenizer computes is appended to it as
            ``((prompt, answer), EncodedPair)`` (how the token cache is filled). ``None``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        padding_side: Literal["left", "right"],
        max_length: int | None = None,
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.padding_side = padding_side
        self.max_length = max_length
        self.pad_id = pad_token_id(tokenizer)
        self.special_ids = frozenset(tokenizer.all_special_ids)
        # what the tokenizer puts before any text (e.g. LLaMA's BOS), registered or not
        self.leading_ids: list[int] = list(tokenizer("", add_special_tokens=True)["input_ids"])
        self.truncated = 0
        self.known: Mapping[tuple[str, str], EncodedPair] = {}
        self.recorded: list[tuple[tuple[str, str], EncodedPair]] | None = None

    def encode(self, pair: QAPair) -> EncodedPair:
        """Tokenize one pair, truncating its prompt from the left to fit ``max_length``.

        Raises:
            ValueError: if the answer (plus leading special tokens and one prompt token) does not
                fit in ``max_length``.
        """
        enc = self.known.get((pair.prompt, pair.answer))
        if enc is None:
            enc = encode_pair(self.tokenizer, pair.prompt, pair.answer)
            if self.recorded is not None:
                self.recorded.append(((pair.prompt, pair.answer), enc))
        if self.max_length is None or len(enc.input_ids) <= self.max_length:
            return enc
        n_special = 0
        for lead, token in zip(self.leading_ids, enc.prompt_ids, strict=False):
            if lead != token:
                break
            n_special += 1
        while n_special < len(enc.prompt_ids) and enc.prompt_ids[n_special] in self.special_ids:
            n_special += 1
        room = self.max_length - n_special - len(enc.answer_ids)
        if room < 1:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for the prompt of {pair.prompt!r}: "
                f"its answer takes {len(enc.answer_ids)} tokens and answers are never truncated"
            )
        self.truncated += 1
        kept = enc.prompt_ids[:n_special] + enc.prompt_ids[n_special:][-room:]
        return EncodedPair(prompt_ids=kept, answer_ids=enc.answer_ids)

    def __call__(self, pairs: Sequence[QAPair]) -> dict[str, torch.Tensor]:
        """Tokenize and pad ``pairs``.

        Args:
            pairs: ``B`` (prompt, answer) pairs.

        Returns:
            ``input_ids``, ``attention_mask`` and ``labels``, each ``[B, L]`` (``L`` the longest
            sequence); ``labels`` equal ``input_ids`` on answer tokens and are ``-100`` elsewhere.

        Raises:
            ValueError: if ``pairs`` is empty or a pair cannot be encoded.
        """
        if not pairs:
            raise ValueError("cannot collate an empty list of pairs")
        encoded = [self.encode(p) for p in pairs]
        input_ids, attention_mask = pad_sequences(
            [e.input_ids for e in encoded], self.pad_id, self.padding_side
        )
        labels, _ = pad_sequences(
            [[IGNORE_INDEX] * len(e.prompt_ids) + e.answer_ids for e in encoded],
            IGNORE_INDEX,
            self.padding_side,
        )
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def first_locality_pair(record: EditRecord) -> QAPair | None:
    """The first pair of the record's first locality group (``None`` when it has none)."""
    for pairs in record.locality.values():
        if pairs:
            return pairs[0]
    return None


class EditCollator:
    """Turn a list of :class:`~lit_edit.records.EditRecord` into a MEND/SERAC training batch.

    The batch is a dict:

    * ``"records"``: the records themselves (a list, in order);
    * ``"edit"``: ``(prompt, target_new)`` of each record;
    * ``"rephrase"``: ``(rephrase_prompts[0], target_new)``, or ``(prompt, target_new)`` for a
      record without rephrase prompts;
    * ``"locality"``: the first pair of the first locality group of each record that has one,
      plus ``"record_index"`` (``[B_loc]``, long): the position in ``"records"`` of each row.
      Records without locality have no row; the key is absent when no record has locality.

    ``"edit"``, ``"rephrase"`` and ``"locality"`` each hold ``input_ids``, ``attention_mask``
    and ``labels`` as built by :class:`PairCollator`.

    Args:
        tokenizer: A Hugging Face tokenizer.
        padding_side: ``"left"`` or ``"right"``; required, never taken from the tokenizer.
        max_length: Longest sequence; prompts are truncated from the left (see
            :class:`PairCollator`).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        padding_side: Literal["left", "right"],
        max_length: int | None = None,
    ) -> None:
        self.pairs = PairCollator(tokenizer, padding_side, max_length)

    @property
    def truncated(self) -> int:
        """Number of pairs whose prompt was truncated so far."""
        return self.pairs.truncated

    def __call__(self, records: Sequence[EditRecord]) -> dict[str, Any]:
        """Build the batch (see the class docstring).

        Raises:
            ValueError: if ``records`` is empty.
        """
        if not records:
            raise ValueError("cannot collate an empty list of records")
        rephrase = [
            QAPair(r.rephrase_prompts[0] if r.rephrase_prompts else r.prompt, r.target_new)
            for r in records
        ]
        batch: dict[str, Any] = {
            "records": list(records),
            "edit": self.pairs([r.edit_pair for r in records]),
            "rephrase": self.pairs(rephrase),
        }
        rows = [(i, first_locality_pair(r)) for i, r in enumerate(records)]
        loc = [(i, p) for i, p in rows if p is not None]
        if loc:
            batch["locality"] = self.pairs([p for _, p in loc])
            batch["locality"]["record_index"] = torch.tensor([i for i, _ in loc], dtype=torch.long)
        return batch


def check_collatable(
    records: Sequence[EditRecord],
    collate: Any,
    collator: PairCollator,
    split: str,
    long_records: str = "error",
) -> list[EditRecord]:
    """Tokenize every record once, before training: a too short ``max_length`` fails at start.

    An answer is never truncated, so a ``max_length`` shorter than one of a record's answers
    would otherwise stop ``fit`` at the first batch holding that record, many steps in.

    Args:
        records: The split's records.
        collate: The method's batch builder (a callable on a list of records).
        collator: The :class:`PairCollator` it uses (its truncation count is left unchanged).
        split: Name of the split (for the error).
        long_records: ``"error"``: raise at the first record that does not fit; ``"skip"``:
            leave such records out (the caller reports them).

    Returns:
        The records that fit (all of them with ``"error"``).

    Raises:
        DataFileError: naming the record's file and index, the split and the setting to raise.
    """
    if collator.max_length is None:
        return list(records)
    truncated = collator.truncated
    kept = []
    try:
        for record in records:
            try:
                collate([record])
            except ValueError as err:
                if long_records == "skip":
                    continue
                raise DataFileError(
                    record.source or "<records>",
                    f"{split} split: {err}; raise the method's max_length "
                    f"(now {collator.max_length}), leave this record out, or set the method's "
                    "long_records: skip",
                    record.index if record.index >= 0 else None,
                ) from err
            kept.append(record)
    finally:
        collator.truncated = truncated
    return kept
