"""Shared locate-then-edit machinery: keys, context prefixes, target values, rank-one solve.

ROME, MEMIT, EMMET, AlphaEdit and ECE (LOCATE_THEN_EDIT.md §1) all treat an MLP output matrix
``W`` (GPT-2 ``mlp.c_proj``, LLaMA ``mlp.down_proj``; :func:`~lit_edit.nn.layout.mlp_out_name`)
as a key-value memory ``v = W k``:

* a **key** ``k`` is the input of ``W`` at the last token of the subject in a prompt
  (:func:`subject_last_positions`, :func:`compute_keys`), averaged over short seeded **context
  prefixes** generated once from the unedited model (:func:`context_prefixes`);
* a **target value** is what ``W``'s (or a block's) output should become there: ``h₀ + δ`` with
  ``δ`` optimised so that the model predicts the new target (:func:`compute_values`, batched
  over facts: one ``δ`` matrix ``[F, d]``, one loop);
* the **rank-one solve** writes ``k* → W k* + δ`` exactly while changing the outputs of other
  keys as little as possible under their second moment ``C`` (:func:`rank_one_update`;
  ``C`` from :mod:`lit_edit.nn.layer_stats`).

Every token index is computed from the character offsets of the one tokenization the model sees
(fast tokenizers), so it is right with or without a BOS token and under left or right padding;
batches here are right-padded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_edit.nn.edit_optim import optimise
from lit_edit.nn.layout import MatrixLayout
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


def _fill(template: str, prompt: str) -> tuple[str, int]:
    """``template`` with ``prompt`` in its placeholder, and where the prompt starts."""
    offset = template.index("{}")
    return template[:offset] + prompt + template[offset + 2:], offset


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def compute_keys(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    module: nn.Module,
    requests: Sequence[FactRequest],
    templates: Sequence[str],
) -> torch.Tensor:
    """Mean over ``templates`` of the input of ``module`` at each request's subject-last token.

    Args:
        model: The causal LM.
        tokenizer: A fast tokenizer.
        module: The edited matrix's layer (its input is the key, e.g. GPT-2 ``mlp.c_proj``).
        requests: ``F`` facts (only prompt and subject are used).
        templates: ``P`` context templates with one ``{}`` (``"{}"`` for the bare prompt).

    Returns:
        ``[F, d_k]`` keys (float32).
    """
    texts, spans = [], []
    for req in requests:
        for template in templates:
            text, offset = _fill(template, req.prompt)
            start = offset + req.prompt.index(req.subject)
            texts.append(text)
            spans.append((start, start + len(req.subject)))
    device = next(model.parameters()).device
    rows = encode_rows(tokenizer, texts, spans).to(device)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
    try:
        model(input_ids=rows.input_ids, attention_mask=rows.attention_mask)
    finally:
        handle.remove()
    x = captured[0]  # [F*P, L, d_k]
    keys = x[torch.arange(x.shape[0], device=device), rows.positions]  # [F*P, d_k]
    return keys.float().reshape(len(requests), len(templates), -1).mean(1)  # [F, d_k]


@dataclass(frozen=True)
class ValueResult:
    """What :func:`compute_values` found, per fact.

    Attributes:
        delta: ``[F, d]`` the optimised shifts ``δ``.
        h0: ``[F, d]`` the unedited output at the site for the bare prompt.
        losses: Per optimisation step, the ``F`` total losses.
    """

    delta: torch.Tensor
    h0: torch.Tensor
    losses: list[list[float]]

    @property
    def targets(self) -> torch.Tensor:
        """``[F, d]`` target values ``h₀ + δ``."""
        return self.h0 + self.delta


def compute_values(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    module: nn.Module,
    requests: Sequence[FactRequest],
    templates: Sequence[str],
    kl_prompt: str = "{} is a",
    steps: int = 20,
    lr: float = 0.5,
    weight_decay: float = 0.5,
    clamp_norm_factor: float = 4.0,
    kl_factor: float = 0.0625,
    stop_below: float = 5e-2,
) -> ValueResult:
    """Optimise one shift ``δ_f`` per fact, added to ``module``'s output at its subject-last token.

    All ``F`` facts run in one batch and one Adam loop (``δ`` is ``[F, d]``). Rows of fact
    ``f``: each template filled with ``prompt_f`` followed by ``" " + target_f`` (teacher
    forced), and the KL row ``kl_prompt`` filled with ``subject_f``. Per fact the loss is

    ``NLL_f + kl_factor · KL(p_cur ‖ p_init) + weight_decay · ‖δ_f‖ / ‖h₀_f‖²``

    where ``NLL_f`` is the mean over templates of the per-token-mean target NLL, the KL is on the
    next-token distribution at the subject-last token of the KL row, and ``h₀_f`` is the
    unedited output at the site of the bare prompt (the first template). After every step each
    ``δ_f`` is clamped to ``‖δ_f‖ ≤ clamp_norm_factor · ‖h₀_f‖``; a fact whose loss falls below
    ``stop_below`` stops (frozen) while the others go on. Since rows never interact and Adam
    is elementwise, the result equals running each fact alone (up to float rounding of the
    different padding). The model's weights are not changed and get no gradient.

    Args:
        model: The causal LM (eval mode).
        tokenizer: A fast tokenizer.
        module: Where ``δ`` is added: ROME the edited matrix's layer, MEMIT a block (its
            output tensor, or the first element of its output tuple).
        requests: ``F`` facts.
        templates: Context templates, the first one ``"{}"``.
        kl_prompt: The essence prompt with ``{}`` for the subject.
        steps: Most Adam steps.
        lr: Adam learning rate.
        weight_decay: Weight of the ``‖δ‖ / ‖h₀‖²`` penalty.
        clamp_norm_factor: Radius of ``δ_f`` relative to ``‖h₀_f‖``.
        kl_factor: Weight of the KL term.
        stop_below: A fact stops once its loss is below this.

    Returns:
        ``δ``, ``h₀`` and the loss history.
    """
    if not templates or templates[0] != "{}":
        raise ValueError("the first context template must be the bare prompt '{}'")
    n_facts, n_templates = len(requests), len(templates)
    texts, spans, cuts = [], [], []
    for req in requests:
        for template in templates:
            filled, offset = _fill(template, req.prompt)
            start = offset + req.prompt.index(req.subject)
            texts.append(f"{filled} {req.target}")
            spans.append((start, start + len(req.subject)))
            cuts.append(len(filled))
    for req in requests:  # the KL rows come after all value rows
        text, offset = _fill(kl_prompt, req.subject)
        texts.append(text)
        spans.append((offset, offset + len(req.subject)))
        cuts.append(None)
    device = next(model.parameters()).device
    rows = encode_rows(tokenizer, texts, spans, cuts).to(device)
    n_rows = rows.input_ids.shape[0]
    owner = torch.cat([
        torch.arange(n_facts).repeat_interleave(n_templates), torch.arange(n_facts)
    ]).to(device)  # [R] fact of each row
    row_idx = torch.arange(n_rows, device=device)
    kl_rows = row_idx[n_facts * n_templates:]  # [F]
    forward = {"input_ids": rows.input_ids, "attention_mask": rows.attention_mask}

    state: dict[str, torch.Tensor | None] = {"delta": None}
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        """Record the site's output; add ``δ`` of each row's fact at its subject-last token."""
        out = _output_tensor(output)
        captured.append(out[row_idx, rows.positions].detach())
        delta = state["delta"]
        if delta is None:
            return output
        shifted = out.index_put((row_idx, rows.positions), delta[owner].to(out.dtype),
                                accumulate=True)  # [R, L, d]
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

    handle = module.register_forward_hook(hook)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:  # only δ gets gradients
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            logits = model(**forward).logits  # [R, L, V]
            init_logp = logits[kl_rows, rows.positions[kl_rows]].float().log_softmax(-1)  # [F, V]
            site = captured[0]  # [R, d]
        h0 = site[torch.arange(n_facts, device=device) * n_templates].float()  # [F, d]
        h0_norm = h0.norm(dim=-1)  # [F]
        delta = torch.zeros(n_facts, h0.shape[-1], device=device, requires_grad=True)
        state["delta"] = delta
        labels = rows.labels[:, 1:]  # [R, L-1] aligned with logits[:, :-1]
        mask = labels != IGNORE_INDEX

        def losses() -> torch.Tensor:
            """The ``F`` per-fact losses at the current ``δ``."""
            captured.clear()
            logits = model(**forward).logits  # [R, L, V]
            logp = logits[:, :-1].float().log_softmax(-1)  # [R, L-1, V]
            picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # [R, L-1]
            per_row = -(picked * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [R]
            nll = per_row[: n_facts * n_templates].reshape(n_facts, n_templates).mean(-1)  # [F]
            cur_logp = logits[kl_rows, rows.positions[kl_rows]].float().log_softmax(-1)
            kl = (cur_logp.exp() * (cur_logp - init_logp)).sum(-1)  # [F] KL(cur ‖ init)
            decay = weight_decay * delta.norm(dim=-1) / h0_norm**2  # [F]
            return nll + kl_factor * kl + decay

        def clamp() -> None:
            """Project every ``δ_f`` onto its ball ``‖δ_f‖ ≤ clamp_norm_factor · ‖h₀_f‖``."""
            limit = clamp_norm_factor * h0_norm  # [F]
            norm = delta.norm(dim=-1)  # [F]
            scale = torch.where(norm > limit, limit / norm.clamp(min=1e-12),
                                torch.ones_like(norm))
            delta.mul_(scale[:, None])

        history = optimise([delta], losses, steps, lr, stop_below=stop_below, project=clamp)
    finally:
        handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return ValueResult(delta.detach(), h0.detach(), history)


def rank_one_update(
    key: torch.Tensor,
    delta_value: torch.Tensor,
    second_moment: torch.Tensor | None = None,
    direction_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """ROME's closed form: the ``[d_out, d_in]`` change ``ΔW`` with ``ΔW k = Δv``.

    Minimises ``ΔW``'s effect on other keys (``‖ΔW K₀‖²``, with ``C = K₀K₀ᵀ/N``) subject to
    ``(W + ΔW) k = W k + Δv``: ``u = C⁻¹ k_dir``, ``ΔW = Δv uᵀ / (uᵀ k)``.

    Args:
        key: ``[d_in]`` the key ``k`` written exactly.
        delta_value: ``[d_out]`` the change of its value, ``Δv = v* − W k``.
        second_moment: ``[d_in, d_in]`` ``C``; ``None`` for ``C = I`` (``mom2_adjustment:
            false``).
        direction_key: ``[d_in]`` key whose ``C⁻¹`` image sets the direction (default ``key``;
            original ROME: the prefix-averaged key, while ``key`` is the bare prompt's).

    Returns:
        ``[d_out, d_in]`` float32 ``ΔW`` (map it to the weight's layout with
        :meth:`~lit_edit.nn.layout.MatrixLayout.to_weight`).
    """
    k = key.double()
    k_dir = k if direction_key is None else direction_key.double()
    if second_moment is None:
        u = k_dir
    else:
        u = torch.linalg.solve(second_moment.double(), k_dir)  # [d_in]
    denominator = u @ k
    if denominator.abs() < 1e-12:
        raise ValueError("the key is (numerically) orthogonal to C⁻¹k: no rank-one update")
    return (delta_value.double()[:, None] * u[None, :] / denominator).float()  # [d_out, d_in]


def apply_matrix_update(weight: nn.Parameter, layout: MatrixLayout, update: torch.Tensor) -> None:
    """Add a ``[d_out, d_in]`` update to ``weight`` in its storage layout (in place).

    Args:
        weight: The matrix parameter.
        layout: Its layout (Conv1D ``[d_in, d_out]`` or ``nn.Linear`` ``[d_out, d_in]``).
        update: ``[d_out, d_in]``.
    """
    with torch.no_grad():
        weight.add_(layout.to_weight(update).to(weight.dtype))


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
