"""The one place that loads Hugging Face models and tokenizers, and finds their inner parameters."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backbone:
    """The model an editor edits, and how to load it.

    In a config, ``backbone: tinyfacts`` (a name alone) or
    ``backbone: {name: meta-llama/Llama-2-7b-hf, dtype: bfloat16}``.

    Args:
        name: ``"tinyfacts"`` (the embedded default), ``"tinyfacts-llama"``,
            ``"tinyfacts-seed<N>"`` (another world), a local directory or a Hugging Face hub
            name.
        dtype: Weights dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        trust_remote_code: Allow code shipped with a hub model to run (off by default).
        revision: Hub revision to pin.
    """

    name: str = "tinyfacts"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    revision: str | None = None

    @classmethod
    def of(cls, spec: Backbone | str | Mapping[str, Any]) -> Backbone:
        """A spec from a name, a mapping of its fields (a checkpoint's hparams) or a spec."""
        if isinstance(spec, Backbone):
            return spec
        if isinstance(spec, str):
            return cls(name=spec)
        if isinstance(spec, Mapping):
            return cls(**dict(spec))
        raise TypeError(f"a backbone is a name or a Backbone spec, got {type(spec).__name__}")

    def to_hparam(self) -> str | dict[str, Any]:
        """The plain form saved in checkpoints: the name alone when the rest is default."""
        if self == Backbone(name=self.name):
            return self.name
        return dataclasses.asdict(self)

    def load_model(self) -> PreTrainedModel:
        """The model, in eval mode (:func:`load_causal_lm`)."""
        return load_causal_lm(self.name, dtype=self.dtype,
                              trust_remote_code=self.trust_remote_code, revision=self.revision)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, with the pad-token policy (:func:`load_tokenizer`)."""
        return load_tokenizer(self.name, trust_remote_code=self.trust_remote_code,
                              revision=self.revision)


class BackboneNotFoundError(OSError):
    """A model name that is neither a local directory nor loadable from the hub (cache).

    Args:
        name_or_path: What was looked up.
        error: The loader's error.
        role: What the model is for, in the message: ``"backbone"``, ``"scope classifier"``, ...
    """

    def __init__(self, name_or_path: str, error: Exception, role: str = "backbone") -> None:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "the hub did not give it"
        super().__init__(
            f"{role} {name_or_path!r}: not a local directory, not in the Hugging Face cache, "
            f"and {why}; give a local directory holding config.json, the weights and the "
            f"tokenizer (e.g. written by save_pretrained) as the {role} ({type(error).__name__})"
        )
        self.name_or_path = name_or_path
        self.role = role


@contextlib.contextmanager
def hub_model_errors(name_or_path: str, path: str, role: str = "backbone") -> Iterator[None]:
    """Turn the loader's error for a hub name that cannot be loaded into one clear error.

    Args:
        name_or_path: The name the user gave.
        path: What it resolved to (an existing path's errors are passed on unchanged).
        role: What the model is for (see :class:`BackboneNotFoundError`).

    Raises:
        BackboneNotFoundError: when loading ``path``, which does not exist, fails with an
            ``OSError`` (not in the cache, the hub offline or unreachable).
    """
    try:
        yield
    except OSError as e:
        if Path(path).exists() or isinstance(e, BackboneNotFoundError):
            raise
        raise BackboneNotFoundError(name_or_path, e, role) from e


def resolve_model_path(name_or_path: str) -> str:
    """Map a model name to something ``from_pretrained`` loads.

    ``"tinyfacts"`` and ``"tinyfacts-llama"`` are the embedded default world's tiny GPT-2 and
    LLaMA models: they are built (about a minute) and cached on first use. Anything else is passed
    through (a local directory or a hub name).

    Args:
        name_or_path: ``"tinyfacts"``, ``"tinyfacts-llama"``, a directory or a hub model name.

    Returns:
        A local path or hub name.
    """
    if name_or_path.startswith("tinyfacts") and not Path(name_or_path).exists():
        from lit_edit.world import resolve_tinyfacts

        return str(resolve_tinyfacts(name_or_path))
    return name_or_path


def load_tokenizer(
    name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and apply the pad-token policy.

    Pad-token policy: a tokenizer without a pad token gets its EOS token as pad token (the field's
    convention for GPT-2 and LLaMA). Padding side is never relied upon: every collate function and
    the scorer take it as an explicit argument.

    Args:
        name_or_path: Model name or path (see :func:`resolve_model_path`).
        trust_remote_code: Allow code from the model repository to run (off by default).
        revision: Hub revision to pin.

    Returns:
        The tokenizer.
    """
    path = resolve_model_path(name_or_path)
    with hub_model_errors(name_or_path, path):
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, revision=revision
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PreTrainedModel:
    """Load a causal language model in eval mode.

    Weights are loaded from safetensors only (no pickle); remote code is refused unless
    ``trust_remote_code`` is set.

    Args:
        name_or_path: Model name or path (see :func:`resolve_model_path`).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        trust_remote_code: Allow code from the model repository to run (off by default).
        revision: Hub revision to pin.

    Returns:
        The model, in eval mode.
    """
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    path = resolve_model_path(name_or_path)
    with hub_model_errors(name_or_path, path):
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtypes[dtype],
            trust_remote_code=trust_remote_code,
            revision=revision,
            use_safetensors=True,
        )
    model.eval()
    return model


def find_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """Return the parameter called ``name``, or fail listing the closest names.

    Args:
        model: The model.
        name: Full parameter name, e.g. ``"transformer.h.1.mlp.c_fc.weight"``.

    Raises:
        KeyError: naming the missing parameter and its closest matches.
    """
    params = dict(model.named_parameters())
    if name in params:
        return params[name]
    close = difflib.get_close_matches(name, list(params), n=5, cutoff=0.5)
    hint = f"; closest matches: {', '.join(close)}" if close else ""
    raise KeyError(
        f"no parameter named {name!r} in {type(model).__name__} ({len(params)} parameters){hint}"
    )


def find_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name``, or fail listing the closest names.

    Args:
        model: The model.
        name: Dotted module path, e.g. ``"transformer.h.1.mlp.c_fc"``.

    Raises:
        KeyError: naming the missing module and its closest matches.
    """
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
    hint = f"; closest matches: {', '.join(close)}" if close else ""
    raise KeyError(f"no module named {name!r} in {type(model).__name__}{hint}")
