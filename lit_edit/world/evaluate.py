"""Teacher-forced token accuracy of a model on a world's facts (the measured accuracies)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_edit.records import QAPair
from lit_edit.tokenization import encode_pair, pad_sequences, pad_token_id, position_ids_from_mask
from lit_edit.world.generator import World


@torch.no_grad()
def token_accuracies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[QAPair],
    batch_size: int = 256,
) -> list[float]:
    """Teacher-forced token accuracy of each pair (METHODS.md §6.1).

    ``prompt + " " + answer`` is tokenized once; the score of a pair is the fraction of its
    answer tokens that are the argmax of the model's prediction at the previous position.

    Args:
        model: A causal LM (put in eval mode for the call, then restored).
        tokenizer: Its tokenizer (must split pairs, see :func:`encode_pair`).
        pairs: The (prompt, answer) pairs.
        batch_size: Pairs per forward pass.

    Returns:
        One accuracy in ``[0, 1]`` per pair.
    """
    was_training = model.training
    model.eval()
    pad = pad_token_id(tokenizer)
    encoded = [encode_pair(tokenizer, p.prompt, p.answer) for p in pairs]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # less padding
    scores = [0.0] * len(encoded)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = pad_sequences([encoded[i].input_ids for i in rows], pad, "left")  # [B, L]
            n_answer = [len(encoded[i].answer_ids) for i in rows]
            keep = max(n_answer) + 1  # the answers sit at the end of the left-padded rows
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                logits_to_keep=keep,
            ).logits  # [B, keep, V]: logits of the last `keep` positions
            predicted = logits[:, :-1].argmax(-1)  # [B, keep-1]: predictions of the last tokens
            target = ids[:, -(keep - 1):]  # [B, keep-1]
            hits = (predicted == target).float()  # [B, keep-1]
            for row, (index, n) in enumerate(zip(rows, n_answer, strict=True)):
                scores[index] = hits[row, keep - 1 - n:].mean().item()
    finally:
        model.train(was_training)
    return scores


def probe_sets(world: World, max_pairs: int | None = None) -> dict[str, list[QAPair]]:
    """The groups of (prompt, answer) pairs on which a pretrained model is measured.

    Args:
        world: The world.
        max_pairs: Keep an evenly spaced subset of at most this many pairs per group.

    Returns:
        ``train_templates`` (every fact in its pretrained templates: memorisation),
        ``held_out_templates`` (every fact in its held-out templates: generalisation),
        ``two_hop_held_out`` (held-out phrasings of pretrained two-hop facts),
        ``two_hop_unseen`` (two-hop facts never pretrained: composition),
        ``alias_statements`` ("X is also known as"), ``alias_seen`` (the pretrained
        alias-phrased facts) and ``alias_unseen`` (facts of the other people phrased with their
        alias: alias resolution). The two alias groups are the ``subject_aliasing``
        portability prompts of edit records (with the true object).
        Empty groups are left out.
    """
    sets: dict[str, list[QAPair]] = {
        "train_templates": [],
        "held_out_templates": [],
        "two_hop_held_out": [],
        "two_hop_unseen": [],
        "alias_statements": [],
        "alias_seen": [],
        "alias_unseen": [],
    }
    for fact in world.facts:
        sets["train_templates"].extend(world.pairs(fact, "train"))
        sets["held_out_templates"].extend(world.pairs(fact, "held_out"))
        if fact.alias_templates:
            seen = world.alias_pretrained[fact.subject_id]
            sets["alias_seen" if seen else "alias_unseen"].extend(world.alias_fact_pairs(fact))
    for two in world.two_hop:
        if two.pretrained:
            sets["two_hop_held_out"].extend(world.two_hop_pairs(two, "held_out"))
        else:
            sets["two_hop_unseen"].extend(world.two_hop_pairs(two, "held_out"))
            sets["two_hop_unseen"].extend(world.two_hop_pairs(two, "train"))
    for pid in range(len(world.aliases)):
        sets["alias_statements"].extend(world.alias_pairs(pid))
    out = {}
    for name, pairs in sets.items():
        if max_pairs is not None and len(pairs) > max_pairs:
            step = len(pairs) / max_pairs
            pairs = [pairs[int(i * step)] for i in range(max_pairs)]
        if pairs:
            out[name] = pairs
    return out


def evaluate_world(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    world: World,
    max_pairs: int | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Mean teacher-forced token accuracy of ``model`` on each group of :func:`probe_sets`.

    Returns:
        ``{group: accuracy}`` plus ``{group + "_n": number of pairs}``.
    """
    out: dict[str, float] = {}
    for name, pairs in probe_sets(world, max_pairs).items():
        scores = token_accuracies(model, tokenizer, pairs, batch_size)
        out[name] = sum(scores) / len(scores)
        out[f"{name}_n"] = len(scores)
    return out
