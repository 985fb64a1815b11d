"""Teacher-forced scoring of (prompt, answer) pairs: one padded forward per batch.

The scorer is the only place where evaluation runs a model on (prompt, answer) pairs; metrics
(:mod:`lit_edit.metrics`) update from the :class:`PairScore` objects it returns and never tokenize
or run a model (DESIGN.md principle 2).

Alignment (METHODS.md §1.3, §6.1): the pair is tokenized once as ``prompt + " " + answer`` with
:func:`lit_edit.tokenization.encode_pair`, giving ``n`` tokens whose last ``T`` are the answer
tokens ``a_1..a_T``. With ``z`` the logits of the sequence (``[n, V]``), the token ``x_t`` is
predicted by ``z_{t-1}``, so for answer token ``a_i`` at position ``t_i = n - T + i - 1``::

    pred_i    = argmax_v z[t_i - 1, v]
    logprob_i = log_softmax(z[t_i - 1])[a_i]

which is EasyEdit's ``test_prediction_acc`` alignment (and ``masked_log_probs``) without the BOS
label of pitfall P3 and with the answer tokenized as it appears in the joined text (P19).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_edit.records import QAPair
from lit_edit.scoring.generation import (
    GeneratedAnswer,
    Generation,
    generate_answers,
    greedy_generate,
    sample_top_k,
)
from lit_edit.scoring.utils import (
    RowContext,
    accepts_logits_to_keep,
    check_positions,
    evaluating,
    length_sorted_batches,
    model_device,
    output_logits,
    owner_context,
    truncate_prompt,
)
from lit_edit.tokenization import (
    EncodedPair,
    encode_pairs,
    pad_sequences,
    pad_token_id,
    position_ids_from_mask,
)


@dataclass(frozen=True, eq=False)
class PairScore:
    """Teacher-forced outputs of a model on one (prompt, answer) pair.

    All tensors are 1-D of length ``T`` (the number of answer tokens) and live on the CPU.

    Attributes:
        answer_ids: ``[T]`` (long) the answer tokens (labels), as in ``prompt + " " + answer``.
        pred_ids: ``[T]`` (long) the argmax token at the position predicting each answer token
            (``logits[t - 1]`` for the token at ``t``).
        logprobs: ``[T]`` (float32) ``log p(answer_ids[i] | prefix)`` for each answer token.
        pair: The scored pair (``None`` for hand-built scores).
    """

    answer_ids: torch.Tensor
    pred_ids: torch.Tensor
    logprobs: torch.Tensor
    pair: QAPair | None = None

    def __post_init__(self) -> None:
        shapes = {self.answer_ids.shape, self.pred_ids.shape, self.logprobs.shape}
        if len(shapes) != 1 or self.answer_ids.dim() != 1 or self.answer_ids.numel() == 0:
            raise ValueError(
                "answer_ids, pred_ids and logprobs must be non-empty 1-D tensors of one length, "
                f"got {self.answer_ids.shape}, {self.pred_ids.shape}, {self.logprobs.shape}"
            )

    @property
    def n_tokens(self) -> int:
        """``T``, the number of answer tokens."""
        return int(self.answer_ids.numel())

    @property
    def correct(self) -> torch.Tensor:
        """``[T]`` (bool) ``pred_ids == answer_ids``."""
        return self.pred_ids == self.answer_ids

    @property
    def token_accuracy(self) -> float:
        """``mean_i 1[pred_i = a_i]`` in ``[0, 1]`` (EasyEdit's per-pair ``*_acc``)."""
        return float(self.correct.float().mean())

    @property
    def exact(self) -> bool:
        """Teacher-forced exact match: every answer token is the argmax."""
        return bool(self.correct.all())

    @property
    def sum_logprob(self) -> float:
        """``sum_i log p(a_i | prefix)`` (the answer's log-likelihood)."""
        return float(self.logprobs.double().sum())

    @property
    def nll(self) -> float:
        """Length-normalised NLL ``-(1/T) sum_i log p(a_i | prefix)`` (ROME's CounterFact NLL)."""
        return -self.sum_logprob / self.n_tokens

    @property
    def perplexity(self) -> float:
        """``exp(nll)``."""
        return math.exp(self.nll)


@dataclass(frozen=True)
class _Encoded:
    input_ids: list[int]
    n_answer: int


class Scorer:
    """Batched teacher-forced scorer of :class:`~lit_edit.records.QAPair` lists.

    The model and tokenizer are arguments of each call (not of the constructor) so that one scorer
    serves the pre-edit model, the edited model and any wrapped model in a protocol. The tokenizer
    is only read: padding uses :func:`~lit_edit.tokenization.pad_token_id` and ``padding_side``
    here, never the tokenizer's own settings.

    A call encodes each distinct ``(prompt, answer)`` once, sorts the sequences by length (longest
    first, so an out-of-memory error happens in the first batch), runs **one forward per batch**
    under ``torch.inference_mode()`` in eval mode (the model's train/eval mode is restored), and
    returns one :class:`PairScore` per input pair, in input order. Explicit ``position_ids``
    (:func:`~lit_edit.tokenization.position_ids_from_mask`) are passed with the attention mask, so
    a padded row scores exactly as the same pair alone, on either padding side.

    Args:
        batch_size: Maximum number of sequences per forward.
        padding_side: ``"left"`` (the field's convention, METHODS.md §1.2) or ``"right"``.
        max_length: If set, a longer sequence keeps its answer and its last prompt tokens (its
            first token is kept too when it is the tokenizer's BOS) so that it has this many
            tokens; an answer that does not fit with at least one prompt token is an error.
            ``None`` never truncates (EasyEdit's behaviour).
    """

    def __init__(
        self, batch_size: int = 64, padding_side: str = "left", max_length: int | None = None
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.batch_size = batch_size
        self.padding_side = padding_side
        self.max_length = max_length

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(batch_size={self.batch_size}, "
            f"padding_side={self.padding_side!r}, max_length={self.max_length})"
        )

    def _encode(
        self, tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, enc: EncodedPair
    ) -> _Encoded:
        prompt_ids, answer_ids = enc.prompt_ids, enc.answer_ids
        if self.max_length is not None:
            prompt_ids = truncate_prompt(
                prompt_ids,
                self.max_length - len(answer_ids),
                tokenizer.bos_token_id,
                f"answer {answer!r} ({len(answer_ids)} tokens) of prompt {prompt!r}",
            )
        return _Encoded(prompt_ids + answer_ids, len(answer_ids))

    def score(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[QAPair],
        owners: Sequence[int] | None = None,
        row_context: RowContext | None = None,
    ) -> list[PairScore]:
        """Score every pair with teacher forcing.

        Args:
            model: A causal LM called as ``model(input_ids=, attention_mask=, position_ids=,
                use_cache=False)`` (all ``[B, L]``) and returning logits ``[B, L, V]`` (or an
                output with ``.logits``); it is run on its own device.
            tokenizer: The model's tokenizer (read only).
            pairs: The pairs to score; duplicates (same owner) are scored once.
            owners: Per pair, the index of the edit it is scored under (parallel single edits:
                rows of one batch under different edits, see
                :class:`~lit_edit.nn.row_deltas.RowDeltas`); ``None``: all under the same state.
            row_context: With ``owners``, called with the owners of each batch's rows; the
                forward of that batch runs inside the context it returns.

        Returns:
            One :class:`PairScore` per pair, in input order (tensors on the CPU).
        """
        if owners is not None and len(owners) != len(pairs):
            raise ValueError(f"{len(owners)} owners for {len(pairs)} pairs")
        keys = [
            (p.prompt, p.answer, -1 if owners is None else owners[i]) for i, p in enumerate(pairs)
        ]
        unique: dict[tuple[str, str, int], int] = {}
        for key in keys:
            unique.setdefault(key, len(unique))
        encoded = [
            self._encode(tokenizer, prompt, answer, enc)
            for (prompt, answer, _), enc in zip(
                unique, encode_pairs(tokenizer, [(p, a) for p, a, _ in unique]), strict=True
            )
        ]
        item_owner = [owner for _, _, owner in unique]
        results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(
            encoded
        )
        pad_id = pad_token_id(tokenizer)
        device = model_device(model)
        lengths = [len(e.input_ids) for e in encoded]
        prompts = list(unique)
        check_positions(model, lengths,
                        lambda i: f"prompt {prompts[i][0]!r} with answer {prompts[i][1]!r}")
        with evaluating(model):
            for batch in length_sorted_batches(lengths, self.batch_size):
                with owner_context(row_context, [item_owner[i] for i in batch]):
                    outs = self._score_batch(model, [encoded[i] for i in batch], pad_id, device)
                for i, out in zip(batch, outs, strict=True):
                    results[i] = out
        scores: list[PairScore] = []
        for pair, key in zip(pairs, keys, strict=True):
            result = results[unique[key]]
            assert result is not None
            # clone outside inference mode: plain tensors, usable anywhere
            answer_ids, pred_ids, logprobs = (t.clone() for t in result)
            scores.append(PairScore(answer_ids, pred_ids, logprobs, pair))
        return scores

    def _score_batch(
        self, model: nn.Module, batch: Sequence[_Encoded], pad_id: int, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One forward on a batch; returns ``(answer_ids, pred_ids, logprobs)`` per sequence."""
        input_ids, mask = pad_sequences([e.input_ids for e in batch], pad_id, self.padding_side)
        width = input_ids.shape[1]
        positions = position_ids_from_mask(mask)
        kwargs = {}
        if self.padding_side == "left" and accepts_logits_to_keep(model):
            # left padding puts every answer in the last columns: project only those onto the
            # vocabulary (the LM head is a third of a tiny model's forward)
            kwargs["logits_to_keep"] = max(enc.n_answer for enc in batch) + 1
        logits = output_logits(
            model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=False,
                **kwargs,
            )
        )  # [B, K, V]: the last K <= L columns
        offset = width - logits.shape[1]  # column c of the sequence is column c - offset here
        rows: list[int] = []
        cols: list[int] = []  # positions of the answer tokens (labels)
        for row, enc in enumerate(batch):
            n = len(enc.input_ids)
            end = width if self.padding_side == "left" else n  # one past the last real token
            rows.extend([row] * enc.n_answer)
            cols.extend(range(end - enc.n_answer, end))
        row_t = torch.tensor(rows, device=logits.device)
        col_t = torch.tensor(cols, device=logits.device)
        labels = input_ids.to(logits.device)[row_t, col_t]  # [N]
        picked = logits[row_t, col_t - 1 - offset].float().log_softmax(-1)  # [N, V]
        preds = picked.argmax(-1)  # [N]
        logprobs = picked.gather(-1, labels[:, None]).squeeze(-1)  # [N]
        sizes = [enc.n_answer for enc in batch]
        return list(
            zip(
                labels.cpu().split(sizes),
                preds.cpu().split(sizes),
                logprobs.cpu().split(sizes),
                strict=True,
            )
        )

    def generate(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        max_new_tokens: int,
        stop_at_eos: bool = True,
    ) -> list[Generation]:
        """Greedy generation in batches of ``batch_size``; see :func:`greedy_generate`."""
        return greedy_generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens,
            batch_size=self.batch_size,
            stop_at_eos=stop_at_eos,
        )

    def generate_answers(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[QAPair],
        owners: Sequence[int] | None = None,
        row_context: RowContext | None = None,
    ) -> list[GeneratedAnswer]:
        """Greedy answers for exact match in batches; see :func:`generate_answers`.

        With ``max_length`` set, prompts are truncated from the left as in :meth:`score`;
        ``owners`` and ``row_context`` as in :meth:`score`.
        """
        return generate_answers(
            model, tokenizer, pairs, batch_size=self.batch_size, max_length=self.max_length,
            owners=owners, row_context=row_context,
        )

    def sample(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        max_length: int = 100,
        top_k: int = 5,
        seed: int = 0,
        owners: Sequence[int] | None = None,
        row_context: RowContext | None = None,
    ) -> list[Generation]:
        """Seeded top-k sampling (fluency) in batches; see :func:`sample_top_k`.

        ``owners`` and ``row_context`` as in :meth:`score`.
        """
        return sample_top_k(
            model,
            tokenizer,
            prompts,
            max_length=max_length,
            top_k=top_k,
            seed=seed,
            batch_size=self.batch_size,
            owners=owners,
            row_context=row_context,
        )
