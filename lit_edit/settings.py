"""Component settings in configs: dataclasses that arrive as objects, mappings or nothing.

A method takes a group of related options as one typed component (``lora: LoraSettings | None``,
``scope: ScopeSettings | None``): the config writes ``lora: {rank: 8}`` or ``lora: null``, the CLI
help documents the fields, and checkpoints keep the plain mapping (safe to load).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def coerce(cls: type[T], value: T | Mapping[str, Any] | None) -> T | None:
    """``value`` as a ``cls`` (a settings dataclass).

    ``value`` is an instance, a mapping of its fields (a checkpoint's hyperparameters) or ``None``.

    Raises:
        TypeError: on anything else, or a mapping with unknown fields (naming them).
    """
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise TypeError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(value))
    raise TypeError(f"expected {cls.__name__}, a mapping of its fields or null, got {value!r}")


def plain(value: Any) -> Any:
    """A settings dataclass as a plain dict (other values unchanged), for saved hyperparameters."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
