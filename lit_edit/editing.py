"""Edit handles: what ``EditorModule.edit`` returns, so that an edit can be undone bit-exactly."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn


class EditHandle:
    """Undoes one edit. Use ``restore()`` or the handle as a context manager.

    Restoring twice is a no-op; subclasses implement :meth:`_restore`.
    """

    def __init__(self) -> None:
        self._restored = False

    @property
    def restored(self) -> bool:
        """Whether :meth:`restore` has run."""
        return self._restored

    def restore(self) -> None:
        """Bring the editor back to its state before the edit (idempotent)."""
        if not self._restored:
            self._restore()
            self._restored = True

    def _restore(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()


class WeightsHandle(EditHandle):
    """Restores parameters from copies taken before they were changed.

    Args:
        params: The parameters the edit is about to change; their current values are copied.
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        super().__init__()
        self._saved = [(p, p.detach().clone()) for p in params]

    def _restore(self) -> None:
        with torch.no_grad():
            for param, original in self._saved:
                param.copy_(original)


class CallbackHandle(EditHandle):
    """Restores by calling a function (e.g. removing entries from an edit memory).

    Args:
        undo: Called once on restore.
    """

    def __init__(self, undo: Callable[[], None]) -> None:
        super().__init__()
        self._undo = undo

    def _restore(self) -> None:
        self._undo()


class HandleStack(EditHandle):
    """Several handles undone in reverse order of application.

    Args:
        handles: Handles in the order their edits were applied.
    """

    def __init__(self, handles: Sequence[EditHandle] = ()) -> None:
        super().__init__()
        self._handles = list(handles)

    def __enter__(self) -> HandleStack:
        return self

    def push(self, handle: EditHandle) -> None:
        """Add the handle of a newer edit."""
        self._handles.append(handle)

    def __len__(self) -> int:
        return len(self._handles)

    def _restore(self) -> None:
        for handle in reversed(self._handles):
            handle.restore()
        self._handles.clear()


def _copy(value: Any) -> Any:
    """A deep copy of a state value (tensors cloned, containers and extra states copied)."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return copy.deepcopy(value)


def same_state(a: Any, b: Any) -> bool:
    """Whether two state values are bit-identical (tensors: dtype, shape and every bit)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (
            torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype
            and a.shape == b.shape and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


class ParameterSnapshot:
    """A full copy of a module's state (parameters, buffers, extra states such as edit memories).

    Used to verify that a restore is bit-exact, and which entries an edit changed.

    Args:
        module: The module to snapshot.
    """

    def __init__(self, module: nn.Module) -> None:
        self._values = {k: _copy(v) for k, v in module.state_dict().items()}

    def differences(self, module: nn.Module) -> list[str]:
        """Names of the entries not bit-identical to the snapshot (or appeared/vanished)."""
        current = module.state_dict()
        names = set(current) | set(self._values)
        return sorted(
            n
            for n in names
            if n not in current
            or n not in self._values
            or not same_state(current[n], self._values[n])
        )
