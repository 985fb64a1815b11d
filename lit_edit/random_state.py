"""Work that must not move the global random streams of the run around it."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

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
