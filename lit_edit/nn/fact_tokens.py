"""Facts as token rows for locate-then-edit: requests, subject positions, context prefixes.

A fact request is ``(prompt, subject, target_new)``. Every token index is computed from the
character offsets of the one tokenization the model sees (fast tokenizers), so it is right with
or without a BOS token and under left or right padding; batches here are right-padded.
Context prefixes (:func:`context_prefixes`) are short seeded generations of the unedited model
that keys and values are averaged over (LOCATE_THEN_EDIT.md §1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_edit.tokenization import IGNORE_INDEX, pad_sequences, pad_token_id


@dataclass(frozen=True)
class FactRequest:
    """One fact to write: the prompt naming the subject and the new target.

    Attributes:
        prompt: The edit prompt, containing ``subject`` (e.g. ``"Ana Lo was born in"``).
        subject: The subject string; its first occurrence in ``prompt`` is the key site.
        target: The new answer, joined to the prompt with one space (``prompt + " " + target``).
    """

    prompt: str
    subject: str
    target: str

    def __post_init__(self) -> None:
        if self.subject not in self.prompt:
            raise ValueError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}")
        if not self.target:
            raise ValueError(f"empty target for prompt {self.prompt!r}")


@dataclass(frozen=True)
class EncodedRows:
    """A right-padded batch of texts with one marked position per row.

    Attributes:
        input_ids: ``[B, L]`` token ids.
        attention_mask: ``[B, L]``, 1 on real tokens.
        positions: ``[B]`` index of the subject's last token in each row.
        labels: ``[B, L]`` target token ids where the row has a target, ``-100`` elsewhere.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> EncodedRows:
        """The batch on ``device``."""
        return EncodedRows(*(t.to(device) for t in (
            self.input_ids, self.attention_mask, self.positions, self.labels)))


def _subject_last_token(
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    special: Sequence[bool],
    start: int,
    end: int,
    text: str,
) -> int:
    """Index of the last non-special token whose characters overlap ``text[start:end]``."""
    last = None
    for i, ((a, b), is_special) in enumerate(zip(offsets, special, strict=True)):
        if is_special:
            continue
        if a < end and b > start:
            last = i
    if last is None:
        raise ValueError(f"no token covers the subject {text[start:end]!r} in {text!r}")
    return last


def encode_rows(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    subject_spans: Sequence[tuple[int, int]],
    target_starts: Sequence[int | None] | None = None,
    padding_side: str = "right",
) -> EncodedRows:
    """Tokenize texts once each and mark the subject's last token (and the target tokens).

    Args:
        tokenizer: A fast tokenizer (character offsets are needed); its own special tokens
            (e.g. BOS) are added and never taken for a subject or target token.
        texts: Full texts (prefix, prompt and, for value rows, ``" " + target``).
        subject_spans: Per text, the character span ``[start, end)`` of the subject.
        target_starts: Per text, the character where the target (with its leading space)
            starts, or ``None`` for a row without target. Tokens whose span ends after it are
            target labels.
        padding_side: ``"right"`` or ``"left"``; positions count the padding either way.

    Returns:
        The padded batch.

    Raises:
        ValueError: with a slow tokenizer, or when a subject or target covers no token.
    """
    if not tokenizer.is_fast:
        raise ValueError("locate-then-edit needs a fast tokenizer (character offsets)")
    targets = list(target_starts) if target_starts is not None else [None] * len(texts)
    special_ids = set(tokenizer.all_special_ids)
    seqs, label_seqs, positions = [], [], []
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=True)
    for text, (s, e), cut, enc in zip(texts, subject_spans, targets, encodings, strict=True):
        ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
        special = [i in special_ids and o == (0, 0) for i, o in zip(ids, offsets, strict=True)]
        while ids and special[-1]:  # a trailing EOS some tokenizers append
            ids, offsets, special = ids[:-1], offsets[:-1], special[:-1]
        positions.append(_subject_last_token(ids, offsets, special, s, e, text))
        labels = [IGNORE_INDEX] * len(ids)
        if cut is not None:
            for i, ((_, b), sp) in enumerate(zip(offsets, special, strict=True)):
                if not sp and b > cut:
                    labels[i] = ids[i]
            if all(x == IGNORE_INDEX for x in labels):
                raise ValueError(f"the target of {text!r} produced no tokens")
        seqs.append(ids)
        label_seqs.append(labels)
    input_ids, mask = pad_sequences(seqs, pad_token_id(tokenizer), padding_side)
    labels, _ = pad_sequences(label_seqs, IGNORE_INDEX, padding_side)
    pos = torch.tensor(positions, dtype=torch.long)
    if padding_side == "left":
        pos = pos + (input_ids.shape[1] - torch.tensor([len(s) for s in seqs]))
    return EncodedRows(input_ids, mask, pos, labels)


def subject_last_positions(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    subjects: Sequence[str],
    padding_side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch ``prompts`` and find the last token of each one's subject (first occurrence).

    Args:
        tokenizer: A fast tokenizer.
        prompts: Texts containing their subject.
        subjects: One subject per prompt.
        padding_side: ``"right"`` or ``"left"``.

    Returns:
        ``(input_ids [B, L], attention_mask [B, L], positions [B])``.
    """
    spans = []
    for prompt, subject in zip(prompts, subjects, strict=True):
        start = prompt.find(subject)
        if start < 0:
            raise ValueError(f"subject {subject!r} does not occur in {prompt!r}")
        spans.append((start, start + len(subject)))
    rows = encode_rows(tokenizer, prompts, spans, padding_side=padding_side)
    return rows.input_ids, rows.attention_mask, rows.positions


@torch.no_grad()
def context_prefixes(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[tuple[int, int]] = ((5, 10),),
    seed: int = 0,
    top_k: int = 5,
    starts: Sequence[str] | None = None,
) -> list[str]:
    """Context templates ``"{}"`` plus seeded short generations of the model, each ``"... {}"``.

    Generated once, from the (unedited) model, with top-``k`` sampling from a seeded
    ``torch.Generator`` (no global RNG is touched), so the same model and seed give the same
    prefixes. Each generation is ended with ``". "`` and gets the placeholder (ROME's rule);
    braces in the generated text are replaced by spaces.

    Args:
        model: The causal LM (in eval mode).
        tokenizer: Its tokenizer.
        lengths: ``(n_tokens, count)`` groups, e.g. ROME's ``((5, 10), (10, 10))``.
        seed: Seed of the sampling.
        top_k: Sampling keeps the ``top_k`` most likely tokens.
        starts: Start texts, cycled (EasyEdit: ``"The", "Therefore", ...``); default: generate
            from the BOS (or EOS) token alone, like the original ROME.

    Returns:
        ``["{}", "<gen 1>. {}", ...]``: ``1 + Σ count`` templates.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (
        tokenizer.eos_token_id)
    out = ["{}"]
    for n_tokens, count in lengths:
        for i in range(count):
            if starts:
                ids = tokenizer(starts[i % len(starts)], add_special_tokens=True)["input_ids"]
            else:
                ids = [start_id]
            ids = torch.tensor([ids], device=device)  # [1, T]
            n_start = ids.shape[1]
            for _ in range(n_tokens):
                logits = model(input_ids=ids).logits[0, -1].float().cpu()  # [V]
                top = logits.topk(top_k)
                choice = torch.multinomial(top.values.softmax(-1), 1, generator=generator)
                ids = torch.cat([ids, top.indices[choice].to(device)[None]], dim=1)
            head = tokenizer.decode(ids[0, 0 if starts else n_start:], skip_special_tokens=True)
            head = head.replace("{", " ").replace("}", " ").strip()
            out.append(f"{head}. {{}}")
    return out


def fill_template(template: str, prompt: str) -> tuple[str, int]:
    """``template`` with ``prompt`` in its placeholder, and where the prompt starts."""
    offset = template.index("{}")
    return template[:offset] + prompt + template[offset + 2:], offset


def requests_of(records: Sequence[Any], describe: Callable[[Any], str] = repr) -> list[FactRequest]:
    """Fact requests of edit records (``prompt``, ``subject``, ``target_new``).

    Args:
        records: :class:`~lit_edit.records.EditRecord` s with a subject.
        describe: Names a record in errors.

    Raises:
        ValueError: for a record without subject, or whose subject is not in its prompt.
    """
    out = []
    for record in records:
        if not record.subject:
            raise ValueError(f"locate-then-edit needs a subject: {describe(record)} has none")
        out.append(FactRequest(record.prompt, record.subject, record.target_new))
    return out
