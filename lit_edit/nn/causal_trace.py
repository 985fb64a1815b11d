"""Causal tracing (Meng et al., ROME §2.1): where a model recalls a fact, layer × token.

Three runs of one prompt:

1. **clean**: the prompt as is; ``p_clean`` = probability of the answer token after it;
2. **corrupted**: Gaussian noise (``std = noise_factor × std`` of the token embeddings, seeded)
   added to the subject's token embeddings, ``samples`` noise draws; ``p_corrupted`` = the
   answer's probability averaged over the draws;
3. **restored**: corrupted, with the clean value of one site written back: the output of block
   ``l`` (``kind="block"``), or the MLP / attention outputs of the layers in a window around
   ``l`` (``kind="mlp"`` / ``"attn"``), at one token ``t``.

The indirect effect of a site is ``p_restored[l, t] − p_corrupted``. Every (site, noise draw)
pair is one row of a batch: the corrupted runs of all layers × tokens take a few forward passes
(``batch_size`` rows each). A restoration is a ``[rows, T]`` mask per layer applied by a forward
hook with ``torch.where``, so restoring every block at every token gives the clean run back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_edit.backbone import find_module
from lit_edit.nn.layout import architecture_of, num_layers

Kind = Literal["block", "mlp", "attn"]


@dataclass(frozen=True)
class TracedPrompt:
    """One tokenized prompt with its subject's tokens and the answer token.

    Attributes:
        input_ids: ``[T]`` token ids (with the tokenizer's BOS if it adds one).
        tokens: The ``T`` token strings, for plot labels.
        subject: ``(first, last + 1)`` token range of the subject.
        answer_id: The answer token whose probability is traced.
    """

    input_ids: torch.Tensor
    tokens: list[str]
    subject: tuple[int, int]
    answer_id: int


@dataclass(frozen=True)
class TraceResult:
    """Restoration effects of one kind of site for one prompt.

    Attributes:
        kind: ``"block"``, ``"mlp"`` or ``"attn"``.
        window: Layers restored together per site.
        p_clean: Answer probability of the clean run.
        p_corrupted: Answer probability with the subject corrupted (mean over noise draws).
        p_restored: ``[L, T]`` answer probability with site ``(l, t)`` restored.
        prompt: The traced prompt.
    """

    kind: str
    window: int
    p_clean: float
    p_corrupted: float
    p_restored: torch.Tensor
    prompt: TracedPrompt

    @property
    def indirect_effect(self) -> torch.Tensor:
        """``[L, T]`` ``p_restored − p_corrupted``."""
        return self.p_restored - self.p_corrupted

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers (JSON-ready)."""
        return {
            "kind": self.kind, "window": self.window, "p_clean": self.p_clean,
            "p_corrupted": self.p_corrupted, "p_restored": self.p_restored.tolist(),
            "indirect_effect": self.indirect_effect.tolist(), "tokens": self.prompt.tokens,
            "subject_tokens": list(self.prompt.subject), "answer_id": self.prompt.answer_id,
        }


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    subject: str,
    answer: str | None = None,
    model: nn.Module | None = None,
) -> TracedPrompt:
    """Tokenize ``prompt`` once and find its subject's tokens and the answer token.

    Args:
        tokenizer: A fast tokenizer (character offsets locate the subject).
        prompt: The prompt, containing ``subject``.
        subject: The subject string (its first occurrence is corrupted).
        answer: The answer whose first token is traced; ``prompt + " " + answer`` is tokenized
            and the first token past the prompt is taken. Default: the model's greedy next token.
        model: Needed when ``answer`` is ``None``.

    Returns:
        The encoded prompt.

    Raises:
        ValueError: when the subject does not occur in the prompt, covers no token, or the
            answer gives no token.
    """
    start = prompt.find(subject) if subject else -1
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    if not tokenizer.is_fast:
        raise ValueError("causal tracing needs a fast tokenizer (character offsets)")
    end = start + len(subject)
    enc = tokenizer.backend_tokenizer.encode(prompt, add_special_tokens=True)
    special = set(tokenizer.all_special_ids)
    ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
    while ids and ids[-1] in special and offsets[-1] == (0, 0):  # a trailing EOS
        ids, offsets = ids[:-1], offsets[:-1]
    covered = [i for i, (a, b) in enumerate(offsets)
               if not (ids[i] in special and (a, b) == (0, 0)) and a < end and b > start]
    if not covered:
        raise ValueError(f"no token covers the subject {subject!r} in {prompt!r}")
    input_ids = torch.tensor(ids, dtype=torch.long)  # [T]
    if answer is None:
        if model is None:
            raise ValueError("give an answer or the model to take its greedy next token")
        device = next(model.parameters()).device
        with torch.no_grad():
            logits = model(input_ids=input_ids[None].to(device)).logits[0, -1]  # [V]
        answer_id = int(logits.argmax())
    else:
        full = prompt + " " + answer.strip()
        enc_full = tokenizer.backend_tokenizer.encode(full, add_special_tokens=True)
        past = [i for (a, b), i in zip(enc_full.offsets, enc_full.ids, strict=True)
                if b > len(prompt) and not (i in special and (a, b) == (0, 0))]
        if not past:
            raise ValueError(f"the answer {answer!r} of {prompt!r} gives no token")
        answer_id = int(past[0])
    tokens = [tokenizer.decode([i]) for i in ids]
    return TracedPrompt(input_ids, tokens, (covered[0], covered[-1] + 1), answer_id)


def embedding_std(model: nn.Module) -> float:
    """Standard deviation of all entries of the model's token-embedding matrix."""
    return float(model.get_input_embeddings().weight.detach().float().std())


def site_modules(model: nn.Module, kind: Kind) -> list[nn.Module]:
    """The per-layer modules whose outputs are restored: blocks, MLPs or attentions.

    Uses :func:`~lit_edit.nn.layout.architecture_of` (GPT-2, GPT-J, NeoX, LLaMA, ...).
    """
    arch = architecture_of(model)
    part = {"block": None, "mlp": arch.mlp, "attn": arch.attention}[kind]
    names = [f"{arch.blocks}.{i}" + (f".{part}" if part else "") for i in range(num_layers(model))]
    return [find_module(model, name) for name in names]


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored for a site at ``layer``: ROME's ``[l − w//2, l + ceil(w/2))``, clipped."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _recording(modules: Sequence[nn.Module], store: list[torch.Tensor | None]) -> Iterator[None]:
    """Record each module's (first) output into ``store``."""
    def make(i: int):
        """The hook of module ``i``."""
        def hook(_m: nn.Module, _a: tuple[Any, ...], output: Any) -> None:
            """Keep the module's output."""
            store[i] = _first(output).detach()
        return hook

    handles = [m.register_forward_hook(make(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _restoring(
    modules: Sequence[nn.Module], clean: Sequence[torch.Tensor], masks: torch.Tensor
) -> Iterator[None]:
    """Write ``clean[j]`` (``[1, T, d]``) where ``masks[j]`` (``[R, T]``) is set, per layer."""
    def make(j: int):
        """The hook of layer ``j``."""
        def hook(_m: nn.Module, _a: tuple[Any, ...], output: Any) -> Any:
            """Write the clean states where the mask of layer ``j`` is set."""
            if not bool(masks[j].any()):
                return None
            out = _first(output)  # [R, T, d]
            new = torch.where(masks[j][:, :, None], clean[j].to(out.dtype), out)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    handles = [m.register_forward_hook(make(j)) for j, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def clean_states(
    model: nn.Module, prompt: TracedPrompt, modules: Sequence[nn.Module]
) -> tuple[list[torch.Tensor], float, torch.Tensor]:
    """The clean run: each module's output, the answer's probability and the embeddings.

    Returns:
        ``(states, p_clean, embeds)``: per module ``[1, T, d]``, a float and ``[1, T, d]``.
    """
    device = next(model.parameters()).device
    ids = prompt.input_ids.to(device)[None]  # [1, T]
    store: list[torch.Tensor | None] = [None] * len(modules)
    embeds = model.get_input_embeddings()(ids)  # [1, T, d]
    with _recording(modules, store):
        logits = model(inputs_embeds=embeds).logits[0, -1].float()  # [V]
    return [s for s in store if s is not None], float(logits.softmax(-1)[prompt.answer_id]), embeds


def corrupted_embeddings(
    embeds: torch.Tensor,
    subject: tuple[int, int],
    noise_std: float,
    samples: int = 10,
    seed: int = 1,
) -> torch.Tensor:
    """``samples`` copies of ``embeds`` (``[1, T, d]``) with Gaussian noise on the subject.

    Args:
        embeds: The clean token embeddings.
        subject: ``(first, last + 1)`` token range that gets noise.
        noise_std: The noise's standard deviation (ROME: 3 × the embeddings' std).
        samples: Noise draws.
        seed: Seed of a private ``torch.Generator`` (no global RNG is touched).

    Returns:
        ``[samples, T, d]``.
    """
    s0, s1 = subject
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(samples, s1 - s0, embeds.shape[-1], generator=generator)  # [S, n_s, d]
    noisy = embeds.expand(samples, -1, -1).clone()  # [S, T, d]
    noisy[:, s0:s1] += (noise_std * noise).to(embeds.device, embeds.dtype)
    return noisy


@torch.no_grad()
def restored_probabilities(
    model: nn.Module,
    inputs_embeds: torch.Tensor,
    modules: Sequence[nn.Module],
    clean: Sequence[torch.Tensor],
    masks: torch.Tensor,
    answer_id: int,
) -> torch.Tensor:
    """One forward pass with chosen clean states written back; the answer's probabilities.

    Args:
        model: The causal LM.
        inputs_embeds: ``[R, T, d]`` (corrupted) input embeddings, one row per run.
        modules: The ``L`` modules whose outputs may be restored (:func:`site_modules`).
        clean: Their clean outputs, ``[1, T, d]`` each (:func:`clean_states`).
        masks: ``[L, R, T]`` bool: restore module ``j``'s output at token ``t`` in row ``r``.
        answer_id: The answer token.

    Returns:
        ``[R]`` probability of the answer after the last token.
    """
    with _restoring(modules, clean, masks):
        logits = model(inputs_embeds=inputs_embeds).logits[:, -1].float()  # [R, V]
    return logits.softmax(-1)[:, answer_id].cpu()


@torch.no_grad()
def trace_prompt(
    model: nn.Module,
    prompt: TracedPrompt,
    kind: Kind = "block",
    window: int | None = None,
    noise_factor: float = 3.0,
    samples: int = 10,
    seed: int = 1,
    batch_size: int = 512,
    embed_std: float | None = None,
) -> TraceResult:
    """Causal trace of one prompt: the answer's probability with each site restored.

    Args:
        model: A causal LM of a known architecture, in eval mode.
        prompt: From :func:`encode_prompt`.
        kind: Restore block outputs, MLP outputs or attention outputs.
        window: Layers restored together (default 1 for ``"block"``, 10 for ``"mlp"`` and
            ``"attn"``, as in ROME).
        noise_factor: Noise std as a multiple of the embeddings' std (ROME's "s3": 3).
        samples: Noise draws per site (ROME: 10); the same draws for every site.
        seed: Seed of the noise.
        batch_size: Rows (site × draw) per forward pass.
        embed_std: The embeddings' std (default :func:`embedding_std`; pass it to reuse).

    Returns:
        ``p_clean``, ``p_corrupted`` and ``p_restored [L, T]``.
    """
    if window is None:
        window = 1 if kind == "block" else 10
    if window < 1 or samples < 1:
        raise ValueError(f"window and samples must be >= 1, got {window} and {samples}")
    modules = site_modules(model, kind)
    clean, p_clean, embeds = clean_states(model, prompt, modules)
    device, n_tok, n_layers = embeds.device, embeds.shape[1], len(modules)
    std = embedding_std(model) if embed_std is None else embed_std
    noisy = corrupted_embeddings(embeds, prompt.subject, noise_factor * std, samples, seed)

    # site s = (l, t) = (s // T, s % T); row r = site * S + draw; one more site: none restored
    n_sites = n_layers * n_tok + 1
    site_layer = torch.arange(n_sites - 1, device=device) // n_tok
    site_token = torch.arange(n_sites - 1, device=device) % n_tok
    covers = torch.zeros(n_layers, n_sites, dtype=torch.bool, device=device)  # [L, sites]
    for layer in range(n_layers):
        for j in window_layers(layer, window, n_layers):
            covers[j, :-1] |= site_layer == layer
    token_hot = torch.zeros(n_sites, n_tok, dtype=torch.bool, device=device)  # [sites, T]
    token_hot[torch.arange(n_sites - 1, device=device), site_token] = True
    probs = torch.empty(n_sites * samples)
    rows = torch.arange(n_sites * samples, device=device)
    for start in range(0, rows.numel(), batch_size):
        chunk = rows[start:start + batch_size]
        site, draw = chunk // samples, chunk % samples
        masks = covers[:, site, None] & token_hot[site][None]  # [L, R, T]
        probs[start:start + chunk.numel()] = restored_probabilities(
            model, noisy[draw], modules, clean, masks, prompt.answer_id)
    probs = probs.view(n_sites, samples).mean(1)  # [sites]
    return TraceResult(kind, window, p_clean, float(probs[-1]),
                       probs[:-1].view(n_layers, n_tok), prompt)


def token_categories(prompt: TracedPrompt) -> list[list[int]]:
    """ROME's six token groups of a prompt, for averaging over facts.

    First subject token, middle subject tokens, last subject token, first token after the
    subject, further tokens, last token (a group can be empty: its rows are then ``nan``).
    """
    s0, s1 = prompt.subject
    n = len(prompt.tokens)
    after = list(range(s1, n))
    return [[s0], list(range(s0 + 1, s1 - 1)), [s1 - 1], after[:1], after[1:-1], [n - 1]]


def category_names() -> tuple[str, ...]:
    """Names of the six groups of :func:`token_categories`, in order."""
    return ("first subject token", "middle subject tokens", "last subject token",
            "first subsequent token", "further tokens", "last token")


def category_effects(result: TraceResult) -> torch.Tensor:
    """``[L, 6]`` indirect effect averaged inside each of :func:`token_categories`."""
    effect = result.indirect_effect  # [L, T]
    cols = [effect[:, idx].mean(1) if idx else torch.full((effect.shape[0],), float("nan"))
            for idx in token_categories(result.prompt)]
    return torch.stack(cols, dim=1)
