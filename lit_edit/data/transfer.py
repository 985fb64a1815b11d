"""Moving batches that hold records to a device.

Lightning's default ``transfer_batch_to_device`` walks dataclasses and fails on frozen ones
("A frozen dataclass was passed to `apply_to_collection`"), so a batch holding
:class:`~lit_edit.records.EditRecord` s cannot go through it. :func:`move_batch_to_device` moves
the tensors and leaves frozen dataclass instances (records, pairs) as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch


def _is_frozen_dataclass(value: Any) -> bool:
    return (
        dataclasses.is_dataclass(value)
        and not isinstance(value, type)
        and type(value).__dataclass_params__.frozen  # type: ignore[attr-defined]
    )


def move_batch_to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor of ``batch`` to ``device``, keeping records and other frozen data as is.

    Dicts, lists and tuples are rebuilt with their type (named tuples included); frozen dataclass
    instances are returned unchanged (they hold no tensors); mutable dataclass instances go
    through Lightning's ``move_data_to_device``; other leaves with a ``to`` method (tensors) are
    moved with it (non-blocking to accelerators, as Lightning does); anything else (strings,
    numbers) is returned as is.

    Args:
        batch: A batch: e.g. a list of ``EditRecord``, or an ``EditCollator`` output.
        device: The target device.

    Returns:
        The batch on ``device``.
    """
    if _is_frozen_dataclass(batch):
        return batch
    if isinstance(batch, Mapping):
        moved = {k: move_batch_to_device(v, device) for k, v in batch.items()}
        return moved if type(batch) is dict else _rebuild_mapping(batch, moved)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_batch_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        from lightning.fabric.utilities.apply_func import move_data_to_device

        return move_data_to_device(batch, device)  # a mutable dataclass: Lightning's way
    to = getattr(batch, "to", None)
    if not callable(to):
        return batch
    device = torch.device(device)
    if isinstance(batch, torch.Tensor) and device.type not in ("cpu", "mps"):
        return batch.to(device, non_blocking=True)
    return to(device)


def _rebuild_mapping(original: Mapping[str, Any], moved: dict[str, Any]) -> Any:
    try:
        return type(original)(moved)
    except TypeError:
        return moved
