"""Batched greedy generation (exact match) and seeded top-k sampling (fluency).

Prompts are left padded and fed with their attention mask and explicit position ids (counting
real tokens only), then decoded one token per step with the model's key/value cache, so a batched
row generates exactly what the same prompt generates alone. A model whose output carries no
cache (``cache``, or ``past_key_values`` in older transformers; e.g. a wrapper without cache
support) is fed the whole sequence at each step instead, with the same result.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_edit.records import QAPair
from lit_edit.scoring.utils import (
    RowContext,
    cache_argument,
    check_positions,
    evaluating,
    length_sorted_batches,
    model_device,
    output_cache,
    output_logits,
    owner_context,
    truncate_prompt,
)
from lit_edit.tokenization import encode_pair, pad_sequences, pad_token_id, position_ids_from_mask

# a generated item: (prompt tokens, owner: the edit it is generated under, -1 for none)
_Item = tuple[tuple[int, ...], int]
# picks the next token of each row: (logits [B, V] float32, the item of each row) -> [B] long
_Picker = Callable[[torch.Tensor, Sequence[_Item]], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Generation:
    """A prompt and the tokens generated after it.

    Attributes:
        prompt: The prompt text.
        prompt_ids: ``[P]`` the prompt's tokens (with the tokenizer's leading special tokens).
        new_ids: ``[N]`` the generated tokens, ``N <= max_new_tokens``; generation stops before an
            EOS when it stops at EOS (the EOS itself is not included).
        text: ``new_ids`` decoded without special tokens.
        full_text: ``prompt_ids + new_ids`` decoded without special tokens (ROME's fluency text).
    """

    prompt: str
    prompt_ids: torch.Tensor
    new_ids: torch.Tensor
    text: str
    full_text: str


@dataclass(frozen=True, eq=False)
class GeneratedAnswer:
    """The greedy continuation of a pair's prompt, cut to each accepted answer's token length.

    Attributes:
        pair: The pair whose prompt was continued.
        new_ids: ``[N]`` greedy tokens, ``N`` = the longest candidate's token count (less if an
            EOS came first).
        candidates: ``(pair.answer, *pair.aliases)``.
        continuations: For each candidate with ``n`` answer tokens (as tokenized in
            ``prompt + " " + candidate``), the first ``n`` generated tokens decoded without
            special tokens.
    """

    pair: QAPair
    new_ids: torch.Tensor
    candidates: tuple[str, ...]
    continuations: tuple[str, ...]


def _generate_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    budgets: Sequence[int],
    pick: _Picker,
    stop_at_eos: bool,
    batch_size: int,
    owners: Sequence[int] | None = None,
    row_context: RowContext | None = None,
) -> list[list[int]]:
    """Generate up to ``budgets[i]`` tokens after each prompt; identical prompts run once.

    With ``owners`` (parallel single edits), prompts are identical only under the same owner,
    and each batch's decoding loop runs inside ``row_context(owners of its rows)``.
    """
    for ids in prompts:
        if not ids:
            raise ValueError("cannot generate from an empty prompt (no token, no BOS)")
    if owners is not None and len(owners) != len(prompts):
        raise ValueError(f"{len(owners)} owners for {len(prompts)} prompts")
    keys = [(tuple(ids), -1 if owners is None else owners[i]) for i, ids in enumerate(prompts)]
    unique: dict[_Item, int] = {}
    for key in keys:
        unique.setdefault(key, len(unique))
    item_budget = [0] * len(unique)
    for key, budget in zip(keys, budgets, strict=True):
        if budget < 0:
            raise ValueError(f"the number of new tokens must be >= 0, got {budget}")
        item = unique[key]
        item_budget[item] = max(item_budget[item], budget)
    items = list(unique)
    check_positions(
        model, [len(ids) + budget for (ids, _), budget in zip(items, item_budget, strict=True)],
        lambda i: (f"a generation of {item_budget[i]} tokens after the prompt "
                   f"{tokenizer.decode(list(items[i][0]))!r}"),
    )
    outputs: list[list[int]] = [[] for _ in items]
    eos = tokenizer.eos_token_id if stop_at_eos else None
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    with evaluating(model):
        for batch in length_sorted_batches([len(ids) for ids, _ in items], batch_size):
            with owner_context(row_context, [items[i][1] for i in batch]):
                new = _decode_batch(
                    model,
                    [items[i] for i in batch],
                    [item_budget[i] for i in batch],
                    pick,
                    eos,
                    pad_id,
                    device,
                )
            for i, ids in zip(batch, new, strict=True):
                outputs[i] = ids
    return [outputs[unique[key]][:budget] for key, budget in zip(keys, budgets, strict=True)]


def _decode_batch(
    model: nn.Module,
    items: Sequence[_Item],
    budgets: Sequence[int],
    pick: _Picker,
    eos: int | None,
    pad_id: int,
    device: torch.device,
) -> list[list[int]]:
    """The decoding loop on one left-padded batch; returns each row's new tokens (no EOS)."""
    ids, mask = pad_sequences([p for p, _ in items], pad_id, "left")  # [B, P]
    ids, mask = ids.to(device), mask.to(device)
    positions = position_ids_from_mask(mask)  # [B, P]
    budget = torch.tensor(list(budgets), device=device)  # [B]
    done = budget == 0  # [B]
    past = None
    name = cache_argument(model)
    new: list[torch.Tensor] = []
    for step in range(max(budgets, default=0)):
        if past is None:
            step_ids, step_pos = ids, positions  # whole sequence: [B, L]
        else:
            step_ids, step_pos = ids[:, -1:], positions[:, -1:]  # last token: [B, 1]
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_pos,
            use_cache=True,
            **{name: past},
        )
        past = output_cache(out)
        logits = output_logits(out)[:, -1].float()  # [B, V]
        token = pick(logits, items).to(device)  # [B]
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new.append(token)
        done = done | (budget <= step + 1)
        if eos is not None:
            done = done | (token == eos)
        if bool(done.all()):
            break
        ids = torch.cat([ids, token[:, None]], dim=1)  # [B, L + 1]
        # a finished row stays at its last position (its outputs are dropped): no row runs past
        # its own prompt + budget, which check_positions verified against the model's table
        positions = torch.cat([positions, positions[:, -1:] + (~done)[:, None].long()],
                              dim=1)  # [B, L + 1]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # [B, L + 1]
    tokens = torch.stack(new, dim=1).tolist() if new else [[] for _ in items]  # [B, S]
    rows: list[list[int]] = []
    for row, limit in zip(tokens, budgets, strict=True):
        row = row[:limit]
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        rows.append(row)
    return rows


def _greedy(logits: torch.Tensor, items: Sequence[_Item]) -> torch.Tensor:
    return logits.argmax(-1)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _generation(
    tokenizer: PreTrainedTokenizerBase, prompt: str, prompt_ids: list[int], new_ids: list[int]
) -> Generation:
    return Generation(
        prompt=prompt,
        prompt_ids=torch.tensor(prompt_ids, dtype=torch.long),
        new_ids=torch.tensor(new_ids, dtype=torch.long),
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        full_text=tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True),
    )


def greedy_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 64,
    stop_at_eos: bool = True,
) -> list[Generation]:
    """Greedy decoding of every prompt, batched with left padding.

    Args:
        model: A causal LM (Hugging Face interface: ``input_ids``, ``attention_mask``,
            ``position_ids``, ``past_key_values``, ``use_cache``); its mode is restored.
        tokenizer: Its tokenizer (read only); prompts get its leading special tokens.
        prompts: Texts to continue.
        max_new_tokens: Tokens to generate per prompt.
        batch_size: Prompts per batch.
        stop_at_eos: Stop a row at its first EOS (excluded from ``new_ids``).

    Returns:
        One :class:`Generation` per prompt, in input order.
    """
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    new = _generate_ids(
        model, tokenizer, ids, [max_new_tokens] * len(ids), _greedy, stop_at_eos, batch_size
    )
    return [_generation(tokenizer, p, i, n) for p, i, n in zip(prompts, ids, new, strict=True)]


def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[QAPair],
    batch_size: int = 64,
    max_length: int | None = None,
    owners: Sequence[int] | None = None,
    row_context: RowContext | None = None,
) -> list[GeneratedAnswer]:
    """Greedy continuations of each pair's prompt for generation-based exact match.

    The prompt tokens are those of :func:`~lit_edit.tokenization.encode_pair` (the conditioning
    of teacher-forced scoring). Generation runs for as many tokens as the longest of the answer and
    its aliases, stopping at EOS; each candidate's continuation is the decoded prefix of its own
    token length. :class:`~lit_edit.metrics.ExactMatch` compares them.

    Args:
        model: A causal LM (see :func:`greedy_generate`).
        tokenizer: Its tokenizer (read only).
        pairs: Pairs whose prompts are continued.
        batch_size: Prompts per batch.
        max_length: Most tokens of prompt plus generated answer: longer prompts keep their BOS
            and their last tokens (``None``: no limit).
        owners: Per pair, the edit it is answered under (see :meth:`Scorer.score`).
        row_context: With ``owners``: the context of each batch, from its rows' owners.

    Returns:
        One :class:`GeneratedAnswer` per pair, in input order.
    """
    prompt_ids: list[list[int]] = []
    lengths: list[list[int]] = []
    for pair in pairs:
        enc = encode_pair(tokenizer, pair.prompt, pair.answer)
        aliases = [encode_pair(tokenizer, pair.prompt, a).answer_ids for a in pair.aliases]
        lengths.append([len(enc.answer_ids), *map(len, aliases)])
        ids = enc.prompt_ids
        if max_length is not None:
            ids = truncate_prompt(
                ids, max_length - max(lengths[-1]), tokenizer.bos_token_id,
                f"the answers of prompt {pair.prompt!r}",
            )
        prompt_ids.append(ids)
    new = _generate_ids(
        model, tokenizer, prompt_ids, [max(n) for n in lengths], _greedy, True, batch_size,
        owners, row_context,
    )
    return [
        GeneratedAnswer(
            pair=pair,
            new_ids=torch.tensor(ids, dtype=torch.long),
            candidates=(pair.answer, *pair.aliases),
            continuations=tuple(tokenizer.decode(ids[:n], skip_special_tokens=True) for n in ns),
        )
        for pair, ids, ns in zip(pairs, new, lengths, strict=True)
    ]


def _row_seed(seed: int, ids: Sequence[int]) -> int:
    """A generator seed that depends only on ``seed`` and the prompt tokens."""
    crc = zlib.crc32(",".join(map(str, ids)).encode())
    return (seed * 1_000_003 + crc) % (2**63 - 1)


def sample_top_k(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_length: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    stop_at_eos: bool = False,
    owners: Sequence[int] | None = None,
    row_context: RowContext | None = None,
) -> list[Generation]:
    """Seeded top-k sampling up to a total length (ROME's ``generate_fast``, METHODS.md §6.2).

    At each step ``p = softmax(z)``; the ``top_k`` most likely tokens are kept, their
    probabilities renormalised to sum to 1, and one is drawn with ``torch.multinomial``. Each
    prompt has its own ``torch.Generator`` seeded from ``seed`` and the prompt's tokens, so the
    text of a prompt depends only on (model, prompt, seed): not on batch size, order, the other
    prompts or the process. Like ROME, generation does not stop at EOS by default (EOS tokens
    are dropped from the decoded text).

    Args:
        model: A causal LM (see :func:`greedy_generate`).
        tokenizer: Its tokenizer (read only).
        prompts: Texts to continue.
        max_length: Total tokens (prompt included) per sequence; a prompt at least this long gets
            no new token (ROME's ``max_out_len``, 100 in EasyEdit).
        top_k: Number of most likely tokens sampled from.
        seed: Base seed.
        batch_size: Prompts per batch.
        stop_at_eos: Stop a row at its first EOS.
        owners: Per prompt, the edit it is sampled under (see :meth:`Scorer.score`).
        row_context: With ``owners``: the context of each batch, from its rows' owners.

    Returns:
        One :class:`Generation` per prompt, in input order; ``full_text`` is the fluency text.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    generators: dict[_Item, torch.Generator] = {}

    def pick(logits: torch.Tensor, rows: Sequence[_Item]) -> torch.Tensor:
        """Sample each row's next token among its ``top_k`` most likely ones."""
        probs = logits.softmax(-1)  # [B, V]
        top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # [B, k]
        top_p = (top_p / top_p.sum(-1, keepdim=True)).cpu()
        choice = torch.empty(len(rows), dtype=torch.long)
        for row, key in enumerate(rows):
            if key not in generators:
                generators[key] = torch.Generator().manual_seed(_row_seed(seed, key[0]))
            choice[row] = torch.multinomial(top_p[row], 1, generator=generators[key])[0]
        return top_i.gather(-1, choice.to(top_i.device)[:, None]).squeeze(-1)  # [B]

    budgets = [max(0, max_length - len(i)) for i in ids]
    new = _generate_ids(
        model, tokenizer, ids, budgets, pick, stop_at_eos, batch_size, owners, row_context
    )
    return [_generation(tokenizer, p, i, n) for p, i, n in zip(prompts, ids, new, strict=True)]
