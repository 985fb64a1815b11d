"""A training DataLoader whose position in the epoch goes into Lightning's checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` that resumes mid-epoch where a checkpoint was taken.

    Lightning saves the ``state_dict`` of every training loader that has one into the
    checkpoint (``loops.fit_loop.state_dict.combined_loader``) and hands it back to
    ``load_state_dict`` on ``fit --ckpt_path``; a plain DataLoader has none, so a resumed run
    restarts the epoch's order from its first batch and trains on other data than an
    uninterrupted one. The state here is what makes the order a function of the run so far:

    * ``generator``: the state of the loader's ``generator`` (the shuffle's random stream) when
      the current pass over the data began, or, once the pass is complete, its state now (the
      next pass starts from it);
    * ``batches``: how many batches of the current pass were handed out.

    The resumed pass resets the generator to ``generator`` and draws (and drops) the first
    ``batches`` batches again, so the order, and every later epoch's, is the uninterrupted
    run's; a sampler that orders by epoch instead (``set_epoch``, e.g. the distributed
    sampler) gets its epoch from Lightning, and the dropped batches are those of the same
    epoch. Dropping costs one fetch per skipped batch: nothing for in-memory records.

    Lightning fetches a sized loader's batches one at a time (no look-ahead), so when a
    checkpoint is written after a training step, ``batches`` is exactly the number of steps'
    batches taken from this pass.

    Args:
        *args: Passed to :class:`~torch.utils.data.DataLoader`.
        **kwargs: Passed to :class:`~torch.utils.data.DataLoader`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pass_start: torch.Tensor | None = None
        self._started = False  # whether a pass has begun
        self._batches = 0
        self._resume: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        """One pass over the data, continuing a loaded position (see the class docstring)."""
        return self._pass()

    def _pass(self) -> Iterator[Any]:
        skip = 0
        if self._resume is not None:
            state, skip = self._resume["generator"], self._resume["batches"]
            self._resume = None
            if state is not None and self.generator is not None:
                self.generator.set_state(state)
        self._pass_start = None if self.generator is None else self.generator.get_state()
        self._started = True
        self._batches = 0
        for batch in super().__iter__():
            self._batches += 1
            if self._batches > skip:
                yield batch

    def state_dict(self) -> dict[str, Any]:
        """The position: the generator state of the pass and the batches handed out of it."""
        if self._resume is not None:  # loaded, and not iterated yet
            return dict(self._resume)
        if not self._started or self._batches >= len(self):
            current = None if self.generator is None else self.generator.get_state()
            return {"generator": current, "batches": 0}
        return {"generator": self._pass_start, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next pass continue from a saved position (see :meth:`state_dict`).

        Raises:
            ValueError: if the state is not one written by :meth:`state_dict`, or its position
                lies past the end of this loader's data (the data changed since it was saved).
        """
        if set(state_dict) != {"generator", "batches"}:
            raise ValueError(
                f"not a ResumableLoader state (keys {sorted(state_dict)}): the checkpoint was "
                "written with another training data loader"
            )
        batches = int(state_dict["batches"])
        if not 0 <= batches <= len(self):
            raise ValueError(
                f"the checkpoint's data position ({batches} batches into the epoch) lies past "
                f"this run's {len(self)} training batches: the training data changed"
            )
        self._resume = {"generator": state_dict["generator"], "batches": batches}
