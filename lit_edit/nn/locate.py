"""Shared locate-then-edit machinery: keys, context prefixes, target values, rank-one solve.

ROME, MEMIT, EMMET, AlphaEdit and ECE (LOCATE_THEN_EDIT.md §1) all treat an MLP output matrix
``W`` (GPT-2 ``mlp.c_proj``, LLaMA ``mlp.down_proj``; :func:`~lit_edit.nn.layout.mlp_out_name`)
as a key-value memory ``v = W k``:

* a **key** ``k`` is the input of ``W`` at the last token of the subject in a prompt
  (:func:`~lit_edit.nn.fact_tokens.subject_last_positions`, :func:`compute_keys`), averaged over
  short seeded **context prefixes** generated once from the unedited model
  (:func:`~lit_edit.nn.fact_tokens.context_prefixes`);
* a **target value** is what ``W``'s (or a block's) output should become there: ``h₀ + δ`` with
  ``δ`` optimised so that the model predicts the new target (:func:`compute_values`, batched
  over facts: one ``δ`` matrix ``[F, d]``, one loop);
* the **rank-one solve** writes ``k* → W k* + δ`` exactly while changing the outputs of other
  keys as little as possible under their second moment ``C`` (:func:`rank_one_update`;
  ``C`` from :mod:`lit_edit.nn.layer_stats`).

Requests, token rows, subject positions and context prefixes live in
:mod:`lit_edit.nn.fact_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_edit.nn.edit_optim import optimise
from lit_edit.nn.fact_tokens import FactRequest, encode_rows, fill_template
from lit_edit.nn.frozen_prefix import replay_frozen
from lit_edit.nn.layout import MatrixLayout
from lit_edit.tokenization import IGNORE_INDEX


def check_value_settings(owner: str, steps: int, kl_prompt: str) -> None:
    """Refuse value-optimisation settings :func:`compute_values` cannot run with.

    Args:
        owner: The editor (named in the error).
        steps: Most Adam steps (>= 1).
        kl_prompt: The essence prompt (needs a ``{}`` for the subject).

    Raises:
        ValueError: naming ``owner`` and the setting.
    """
    if steps < 1:
        raise ValueError(f"{owner}: steps must be >= 1, got {steps}")
    if "{}" not in kl_prompt:
        raise ValueError(f"{owner}: kl_prompt needs a '{{}}' for the subject, got {kl_prompt!r}")


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def compute_keys(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    module: nn.Module,
    requests: Sequence[FactRequest],
    templates: Sequence[str],
    read: Literal["input", "output"] = "input",
) -> torch.Tensor:
    """Mean over ``templates`` of the input of ``module`` at each request's subject-last token.

    Args:
        model: The causal LM.
        tokenizer: A fast tokenizer.
        module: The edited matrix's layer (its input is the key, e.g. GPT-2 ``mlp.c_proj``).
        requests: ``F`` facts (only prompt and subject are used).
        templates: ``P`` context templates with one ``{}`` (``"{}"`` for the bare prompt).
        read: ``"input"`` (keys) or ``"output"`` (e.g. a block's hidden state, the first
            element of an output tuple: MEMIT's residuals).

    Returns:
        ``[F, d_k]`` keys (float32), or ``[F, d]`` outputs.
    """
    texts, spans = [], []
    for req in requests:
        for template in templates:
            text, offset = fill_template(template, req.prompt)
            start = offset + req.prompt.index(req.subject)
            texts.append(text)
            spans.append((start, start + len(req.subject)))
    device = next(model.parameters()).device
    rows = encode_rows(tokenizer, texts, spans).to(device)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, out: captured.append(
        args[0] if read == "input" else _output_tensor(out)))
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
    different padding). The model's weights are not changed and get no gradient. What lies
    below ``module`` runs once and is replayed at every step
    (:func:`~lit_edit.nn.frozen_prefix.replay_frozen`, exact).

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
            filled, offset = fill_template(template, req.prompt)
            start = offset + req.prompt.index(req.subject)
            texts.append(f"{filled} {req.target}")
            spans.append((start, start + len(req.subject)))
            cuts.append(len(filled))
    for req in requests:  # the KL rows come after all value rows
        text, offset = fill_template(kl_prompt, req.subject)
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
    forward = {"input_ids": rows.input_ids, "attention_mask": rows.attention_mask,
               "use_cache": False}
    site = next(name for name, m in model.named_modules() if m is module)

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
        # what lies below the site runs once and is replayed at every step (exact)
        with replay_frozen(model, f"{site}.weight"):
            with torch.no_grad():
                logits = model(**forward).logits  # [R, L, V]
                kl_at = rows.positions[kl_rows]
                init_logp = logits[kl_rows, kl_at].float().log_softmax(-1)  # [F, V]
                at_site = captured[0]  # [R, d]
            h0 = at_site[torch.arange(n_facts, device=device) * n_templates].float()  # [F, d]
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
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
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
        factor: ``torch.linalg.lu_factor(C.double())``, when one ``C`` serves many edits:
            ``C⁻¹ k`` is then a triangular solve (``O(d²)`` instead of ``O(d³)`` per edit; the
            same values as ``linalg.solve``, which factorises the same way). Used instead of
            ``second_moment``.

    Returns:
        ``[d_out, d_in]`` float32 ``ΔW`` (map it to the weight's layout with
        :meth:`~lit_edit.nn.layout.MatrixLayout.to_weight`).
    """
    k = key.double()
    k_dir = k if direction_key is None else direction_key.double()
    if factor is not None:
        u = torch.linalg.lu_solve(*factor, k_dir[:, None])[:, 0]  # [d_in]
    elif second_moment is None:
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
