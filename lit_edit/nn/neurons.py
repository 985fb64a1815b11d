"""Neuron attribution, selection and clustering for ECE (LOCATE_THEN_EDIT.md §7).

The "neurons" of an MLP output matrix ``W`` (``[d_out, d_k]`` as a map, whatever its storage;
:class:`~lit_edit.nn.layout.MatrixLayout`) are its ``d_k`` input coordinates: the MLP's hidden
units, whose values at a fact's subject-last token are the fact's key ``k``. Every score here is
a ``[n, d_k]`` tensor, one row per fact, indexed by those units — never by ``W``'s output
dimension (the release's GPT-2 ``Conv1D`` bug, §7.3/§7.6 item 6):

* ``activation`` (the release's AS): ``s_{b,i} = |k_{b,i}|``;
* ``weight_l1`` (WI): ``s_i = Σ_o |W[o, i]|``, the L1 norm of unit ``i``'s outgoing column
  (fact-independent: the same for every row);
* ``act_x_weight`` (RS, correctly paired): ``s_{b,i} = |k_{b,i}| · Σ_o |W[o, i]|``, the size of
  unit ``i``'s contribution to the output (the release pairs activation ``k`` with output row
  ``k`` and keeps the sign);
* ``grad_x_act`` (an attribution the release does not have): ``s_{b,i} = |k_{b,i} · g_{b,i}|``
  with ``g_b = ∂ NLL_b / ∂ k_b`` the gradient of the new target's teacher-forced NLL after fact
  ``b``'s bare prompt (:func:`key_gradients`), the first-order effect of unit ``i`` on the edit.

Selection (:func:`select_neurons`) keeps per row the top ``k`` units, a fraction of them, or
the release's nucleus rule (the longest top prefix whose cumulative score is at most ``p`` of
the row's total). Clustering (:func:`jaccard_matrix`, :func:`cluster_facts`) groups facts by
the Jaccard similarity of their unit sets with spectral clustering (the commented-out block of
NSE that §7.4 reads as the paper's "clustering by explanation results").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_edit.nn.fact_tokens import FactRequest, encode_rows
from lit_edit.tokenization import IGNORE_INDEX

NeuronScore = Literal["none", "activation", "weight_l1", "act_x_weight", "grad_x_act"]
NeuronRule = Literal["top_k", "fraction", "top_p"]


def neuron_scores(
    score: NeuronScore,
    keys: torch.Tensor,
    weight: torch.Tensor,
    gradients: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-fact scores of an MLP output matrix's input units.

    Args:
        score: ``"activation"``, ``"weight_l1"``, ``"act_x_weight"`` or ``"grad_x_act"``
            (``"none"``: every unit scores 1).
        keys: ``[n, d_k]`` the facts' keys (inputs of the matrix at the subject-last token).
        weight: ``[d_out, d_k]`` the matrix as a map (``MatrixLayout.from_weight``).
        gradients: ``[n, d_k]`` ``∂ NLL / ∂ k`` per fact (needed by ``"grad_x_act"``).

    Returns:
        ``[n, d_k]`` non-negative float32 scores.

    Raises:
        ValueError: on an unknown score, mismatched shapes or missing gradients.
    """
    if keys.ndim != 2 or weight.ndim != 2 or weight.shape[1] != keys.shape[1]:
        raise ValueError(f"keys [n, d_k] and weight [d_out, d_k] expected, got "
                         f"{tuple(keys.shape)} and {tuple(weight.shape)}")
    k = keys.float()
    column_l1 = weight.detach().float().abs().sum(0)  # [d_k]
    if score == "none":
        return torch.ones_like(k)
    if score == "activation":
        return k.abs()
    if score == "weight_l1":
        return column_l1.expand_as(k).clone()
    if score == "act_x_weight":
        return k.abs() * column_l1
    if score == "grad_x_act":
        if gradients is None or gradients.shape != keys.shape:
            raise ValueError("grad_x_act needs [n, d_k] key gradients")
        return (k * gradients.float()).abs()
    raise ValueError(f"neuron_score must be one of none, activation, weight_l1, act_x_weight, "
                     f"grad_x_act; got {score!r}")


def select_neurons(scores: torch.Tensor, rule: NeuronRule, amount: float) -> torch.Tensor:
    """Per row, the chosen units as a boolean mask.

    Args:
        scores: ``[n, d_k]`` non-negative scores.
        rule: ``"top_k"`` (the ``int(amount)`` best), ``"fraction"`` (the best
            ``ceil(amount · d_k)``) or ``"top_p"`` (the release's rule: the longest top prefix
            whose cumulative score is at most ``amount`` of the row's sum, at least one unit).
        amount: ``k``, the fraction or ``p``.

    Returns:
        ``[n, d_k]`` bool mask. Ties are broken by the lower index (a stable sort).

    Raises:
        ValueError: on an unknown rule or an amount out of range.
    """
    n, d = scores.shape
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices  # [n, d]
    if rule == "top_k":
        if not 1 <= amount <= d or amount != int(amount):
            raise ValueError(f"top_k needs an integer amount in [1, {d}], got {amount}")
        counts = torch.full((n,), int(amount))
    elif rule == "fraction":
        if not 0 < amount <= 1:
            raise ValueError(f"fraction needs an amount in (0, 1], got {amount}")
        counts = torch.full((n,), max(1, int(torch.tensor(amount * d).ceil())))
    elif rule == "top_p":
        if not 0 < amount <= 1:
            raise ValueError(f"top_p needs an amount in (0, 1], got {amount}")
        ranked = scores.double().gather(-1, order)  # [n, d] descending
        cumulative = ranked.cumsum(-1)  # [n, d]
        within = cumulative <= amount * ranked.sum(-1, keepdim=True) * (1 + 1e-12)
        counts = within.sum(-1).clamp(min=1)  # [n]
    else:
        raise ValueError(f"neuron_rule must be top_k, fraction or top_p, got {rule!r}")
    ranks = torch.arange(d).expand(n, d)  # [n, d]
    keep_sorted = ranks < counts[:, None]  # [n, d] in sorted order
    mask = torch.zeros(n, d, dtype=torch.bool)
    return mask.scatter(-1, order.cpu(), keep_sorted)


def key_gradients(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    modules: Sequence[nn.Module],
    requests: Sequence[FactRequest],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and ``∂ NLL / ∂ k`` at each fact's subject-last token, for several matrices at once.

    One forward and one backward over the bare prompts followed by the new targets (teacher
    forced); ``NLL_b`` is the mean NLL of fact ``b``'s target tokens. A zero probe is added to
    every matrix's input, so the gradient flows through all of them (nothing is detached).
    The model's weights get no gradient and are not changed.

    Args:
        model: The causal LM.
        tokenizer: A fast tokenizer.
        modules: The matrices' layers (their input is the key).
        requests: ``n`` facts.

    Returns:
        Per module, ``(keys [n, d_k], gradients [n, d_k])`` (float32).
    """
    texts, spans, cuts = [], [], []
    for req in requests:
        start = req.prompt.index(req.subject)
        texts.append(f"{req.prompt} {req.target}")
        spans.append((start, start + len(req.subject)))
        cuts.append(len(req.prompt))
    device = next(model.parameters()).device
    rows = encode_rows(tokenizer, texts, spans, cuts).to(device)
    probes: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Add a zero leaf to the input (its gradient is the input's)."""
        probe = torch.zeros_like(args[0], requires_grad=True)
        probes.append(probe)
        inputs.append(args[0].detach())
        return (args[0] + probe, *args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                           use_cache=False).logits  # [n, L, V]
            labels = rows.labels[:, 1:]  # [n, L-1]
            mask = labels != IGNORE_INDEX
            logp = logits[:, :-1].float().log_softmax(-1)  # [n, L-1, V]
            picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # [n, L-1]
            nll = -(picked * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [n]
            grads = torch.autograd.grad(nll.sum(), probes)
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    at = (torch.arange(len(requests), device=device), rows.positions)
    return [(x[at].float(), g[at].float()) for x, g in zip(inputs, grads, strict=True)]


def jaccard_matrix(sets: torch.Tensor) -> torch.Tensor:
    """Pairwise Jaccard similarity ``|A ∩ B| / |A ∪ B|`` of the rows' unit sets.

    Args:
        sets: ``[n, d]`` bool masks.

    Returns:
        ``[n, n]`` float64 similarities (1 on the diagonal; two empty sets count as equal).
    """
    m = sets.double()  # [n, d]
    inter = m @ m.T  # [n, n]
    sizes = m.sum(-1)  # [n]
    union = sizes[:, None] + sizes[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def cluster_facts(sets: torch.Tensor, n_clusters: int, seed: int = 0) -> list[list[int]]:
    """Group facts by their unit sets: spectral clustering on the Jaccard affinity.

    scikit-learn's ``SpectralClustering(affinity="precomputed", assign_labels="kmeans")``
    (NSE's commented-out block, §7.4), seeded.

    Args:
        sets: ``[n, d]`` bool masks, one per fact.
        n_clusters: Wanted clusters (at most ``n``; ``1`` or one fact: a single cluster).
        seed: ``random_state`` of the clustering.

    Returns:
        The clusters as lists of fact indices, each ascending, ordered by their first fact;
        empty clusters are dropped.
    """
    n = sets.shape[0]
    k = min(int(n_clusters), n)
    if k <= 1:
        return [list(range(n))]
    from sklearn.cluster import SpectralClustering

    affinity = jaccard_matrix(sets).numpy()
    labels = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels="kmeans",
                                random_state=seed).fit_predict(affinity)
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(int(label), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])
