"""The global random streams: kept around side tasks, saved in and restored from checkpoints."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


@contextmanager
def preserved_random_state() -> Iterator[None]:
    """Run a block and leave Python's, NumPy's and torch's (CPU) global random states as they were.

    A run seeds its global generators once (``seed_everything``); a side task inside it (building
    and pretraining a TinyFacts model on first use, training a scope head) draws from them, so
    without this the run's figures would depend on whether that task ran (a cold cache or a
    warm one).
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def random_states() -> dict[str, Any]:
    """The global random states of Python, NumPy and torch (CPU, and every CUDA device).

    Returns:
        A dict for :func:`set_random_states`, of tensors and plain Python values only (it goes
        into checkpoints, which Lightning loads with ``weights_only=True``).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Put back the global random states saved by :func:`random_states`.

    A CUDA state is set only when this machine has CUDA devices (a run resumed on CPU from a
    GPU run's checkpoint keeps its CPU streams).

    Raises:
        ValueError: if ``states`` lacks the Python, NumPy or torch state.
    """
    missing = [k for k in ("python", "numpy", "torch") if k not in states]
    if missing:
        raise ValueError(f"saved random states lack {', '.join(missing)}")
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
