"""Settings of a TinyFacts world and of the tiny language models pretrained on it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Arch = Literal["gpt2", "llama"]


def _from_mapping(cls: type, data: Mapping[str, Any], what: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; known fields: {sorted(names)}")
    return cls(**dict(data))


@dataclass(frozen=True)
class WorldConfig:
    """Size and seed of a generated TinyFacts world.

    The default world has 1,984 facts: 4 per person (born in, lives in, works for, speaks),
    one per city (located in), two per country (capital, official language) and one per company
    (headquartered in).

    Attributes:
        seed: Seed of every random choice (names, facts, held-out templates).
        n_people: Number of people (subjects of 4 relations each; each has an alias).
        n_cities: Number of cities (each located in one country).
        n_countries: Number of countries (each has a capital among its cities and an official
            language); must not exceed ``n_cities``.
        n_companies: Number of companies (each headquartered in one city).
        n_languages: Number of languages.
        held_out_per_fact: Templates of a fact's relation held out of pretraining for that
            fact only (they become its rephrase prompts); every template still appears with the
            other facts. Must be smaller than the number of templates per relation (6).
        two_hop_held_out_per_fact: Two-hop templates held out per two-hop fact (out of 3).
        two_hop_train_fraction: Fraction of subjects whose (non-held-out) two-hop phrasings are
            pretrained; the others never see a two-hop phrasing (a pure composition test).
        alias_templates_per_fact: Training templates (of the fact's) in which each fact about a
            person is also phrased with the person's alias.
        alias_train_fraction: Fraction of people whose facts are pretrained phrased with their
            alias; every alias statement ("X is also known as Y") is always pretrained.
    """

    seed: int = 0
    n_people: int = 420
    n_cities: int = 160
    n_countries: int = 32
    n_companies: int = 80
    n_languages: int = 24
    held_out_per_fact: int = 2
    two_hop_held_out_per_fact: int = 1
    two_hop_train_fraction: float = 1.0
    alias_templates_per_fact: int = 2
    alias_train_fraction: float = 1.0

    def __post_init__(self) -> None:
        for name in ("n_people", "n_cities", "n_countries", "n_companies", "n_languages"):
            if getattr(self, name) < 2:
                raise ValueError(f"WorldConfig.{name} must be at least 2, got "
                                 f"{getattr(self, name)}")
        if self.n_countries > self.n_cities:
            raise ValueError(
                f"WorldConfig.n_countries ({self.n_countries}) must not exceed n_cities "
                f"({self.n_cities}): every country needs a capital city"
            )
        if not 0 <= self.held_out_per_fact < 6:
            raise ValueError(f"WorldConfig.held_out_per_fact must be in [0, 5], got "
                             f"{self.held_out_per_fact}")
        if not 0 <= self.two_hop_held_out_per_fact < 3:
            raise ValueError(f"WorldConfig.two_hop_held_out_per_fact must be in [0, 2], got "
                             f"{self.two_hop_held_out_per_fact}")
        if not 1 <= self.alias_templates_per_fact <= 6 - self.held_out_per_fact:
            raise ValueError(
                f"WorldConfig.alias_templates_per_fact must be in [1, {6 - self.held_out_per_fact}]"
                f" (the fact's pretrained templates), got {self.alias_templates_per_fact}"
            )
        for name in ("two_hop_train_fraction", "alias_train_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorldConfig:
        """Build from :meth:`to_dict` output.

        Raises:
            ValueError: on an unknown field.
        """
        return _from_mapping(cls, data, "WorldConfig")


@dataclass(frozen=True)
class TinyLMConfig:
    """Architecture and pretraining settings of a tiny causal LM for a TinyFacts world.

    The defaults (2 layers, width 128, 4 heads, a 2048-token BPE: 0.68M parameters with tied
    embeddings) learn the default world to over 95% token accuracy on its pretrained phrasings
    in 8 epochs (about a minute on two CPU cores).

    Attributes:
        arch: ``"gpt2"`` (``GPT2LMHeadModel``, ``Conv1D`` MLP) or ``"llama"``
            (``LlamaForCausalLM``, gated ``nn.Linear`` MLP).
        n_layer: Number of transformer blocks.
        n_embd: Hidden width.
        n_head: Attention heads.
        intermediate_size: MLP width; ``None`` means ``4 * n_embd`` for GPT-2 and
            ``8/3 * n_embd`` rounded up to a multiple of 32 for LLaMA.
        vocab_size: Size of the byte-level BPE trained on the world's text.
        max_epochs: Passes over the pretraining text.
        batch_size: Sequences (whole facts) per optimisation step.
        lr: Peak AdamW learning rate (linear warm-up, then cosine decay to ``lr * min_lr_ratio``).
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        warmup_ratio: Fraction of the steps spent warming up.
        weight_decay: AdamW weight decay (not applied to biases, norms and embeddings).
        answer_weight: Loss weight of each fact's answer tokens relative to the other tokens
            (1 is plain language modelling). The other tokens keep a weight of 1: predicting the
            names builds the subject representations the facts are stored under (training on
            the answers alone learns far slower), while weighting the answers 8x about halves
            the epochs needed to memorise the default world.
        seed: Seed of the weight initialisation and of the data order.
        num_threads: CPU threads the model is trained and measured with. Part of the settings
            and of the cache key: the thread count changes the order of floating-point
            reductions and so the trained weights. The default (1) makes a build a function of
            its settings alone, whatever the machine's load or the caller's thread setting.
    """

    arch: Arch = "gpt2"
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    intermediate_size: int | None = None
    vocab_size: int = 2048
    max_epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    answer_weight: float = 8.0
    seed: int = 0
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"TinyLMConfig.arch must be 'gpt2' or 'llama', got {self.arch!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"TinyLMConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        for name in ("n_layer", "n_embd", "n_head", "max_epochs", "batch_size", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyLMConfig.{name} must be positive, got {getattr(self, name)}")
        if self.vocab_size < 300:
            raise ValueError(
                f"TinyLMConfig.vocab_size must be at least 300 (256 bytes + specials + merges), "
                f"got {self.vocab_size}"
            )

    @property
    def mlp_size(self) -> int:
        """The MLP width actually used (resolves ``intermediate_size=None``)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.arch == "gpt2":
            return 4 * self.n_embd
        return -(-(8 * self.n_embd // 3) // 32) * 32

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TinyLMConfig:
        """Build from :meth:`to_dict` output.

        Raises:
            ValueError: on an unknown field.
        """
        return _from_mapping(cls, data, "TinyLMConfig")


def settings_hash(*parts: Mapping[str, Any]) -> str:
    """Return a short stable hash of JSON-serialisable settings (used as a cache key)."""
    text = json.dumps(list(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
