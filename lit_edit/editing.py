"""Edit handles: what ``EditorModule.edit`` returns, so that an edit can be undone bit-exactly."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
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

    @property
    def saved_bytes(self) -> int:
        """Bytes of the tensor copies the handle holds to restore (0 once restored)."""
        return 0

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

    @property
    def saved_bytes(self) -> int:
        """Bytes of the copies (one per parameter)."""
        return sum(copy.nbytes for _, copy in self._saved)

    def _restore(self) -> None:
        with torch.no_grad():
            for param, original in self._saved:
                param.copy_(original)
        self._saved.clear()  # the copies are not needed any more


@contextmanager
def restored_on_error(handle: EditHandle) -> Iterator[None]:
    """Undo an edit whose application fails half-way, then re-raise.

    For an edit that changes parameters in steps (e.g. MEMIT, layer after layer): a
    :class:`WeightsHandle` is restored at once; a :class:`CoveredEdit` is left to its
    sequence, whose rollback restores it.

    Args:
        handle: The edit's handle, taken before the first change.
    """
    try:
        yield
    except BaseException:
        if not isinstance(handle, CoveredEdit):
            handle.restore()
        raise


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

    @property
    def saved_bytes(self) -> int:
        """Bytes of the copies held by the handles on the stack."""
        return sum(h.saved_bytes for h in self._handles)

    def _restore(self) -> None:
        for handle in reversed(self._handles):
            handle.restore()
        self._handles.clear()


class EditSequence(HandleStack):
    """Edits applied one after another and undone together, with one copy of what they change.

    What the sequential protocol keeps for a group (:func:`~lit_edit.editor.open_sequence`).
    A sequence restores only at its end, to the state before its first edit, so a parameter
    changed in place needs one copy per sequence, not one per edit: an editor asks
    :meth:`cover` (through :meth:`EditorSequences.weights_handle`) before changing parameters,
    the sequence copies those it has not copied yet, and the edit's handle is a
    :class:`CoveredEdit` holding nothing. Other handles (e.g. an edit memory's truncation) are
    pushed and undone in reverse order, interleaved with the copies in the order they were
    taken, so that restoring is bit-exact whatever mix of handles the sequence holds.

    Restored (or exited), the sequence holds nothing; a restored sequence cannot cover again.
    """

    def __init__(self) -> None:
        super().__init__()
        self._covered: set[int] = set()  # ids of the parameters copied (alive: held by a copy)
        self._owners: list[object] = []  # the owners of covered states (keeps their ids alive)

    def __enter__(self) -> EditSequence:
        return self

    def cover(self, params: Iterable[nn.Parameter]) -> CoveredEdit:
        """Copy the parameters not copied yet in this sequence; the edit's (empty) handle.

        Call it before changing ``params`` in place, like :class:`WeightsHandle`.

        Args:
            params: The parameters the edit is about to change.

        Returns:
            The edit's handle: restored with the sequence, it cannot undo its edit alone.

        Raises:
            RuntimeError: if the sequence was already restored.
        """
        if self.restored:
            raise RuntimeError("this edit sequence was restored: open a new one")
        new = list({id(p): p for p in params if id(p) not in self._covered}.values())
        if new:
            self._handles.append(WeightsHandle(new))
            self._covered.update(id(p) for p in new)
        return CoveredEdit(self)

    def cover_state(self, owner: object, take: Callable[[], EditHandle]) -> CoveredEdit:
        """Take ``owner``'s state handle if this sequence has not yet; the edit's (empty) handle.

        Args:
            owner: The object whose (non-parameter) state the edit is about to change.
            take: Makes the handle restoring ``owner``'s current state.

        Returns:
            The edit's handle: restored with the sequence, it cannot undo its edit alone.

        Raises:
            RuntimeError: if the sequence was already restored.
        """
        if self.restored:
            raise RuntimeError("this edit sequence was restored: open a new one")
        if id(owner) not in self._covered:
            self._handles.append(take())
            self._covered.add(id(owner))
            self._owners.append(owner)  # keeps the id valid while the sequence is open
        return CoveredEdit(self)

    def push(self, handle: EditHandle) -> None:
        """Add the handle of a newer edit (a handle covered by this sequence is not kept)."""
        if isinstance(handle, CoveredEdit) and handle.sequence is self:
            return
        super().push(handle)

    def _restore(self) -> None:
        super()._restore()
        self._covered.clear()
        self._owners.clear()


class CoveredEdit(EditHandle):
    """The handle of an edit inside an :class:`EditSequence`, whose copy the sequence holds.

    It holds no tensor. Its edit is undone when the sequence is restored; restoring it alone
    before that raises (no copy was taken for this edit alone), after that it is a no-op.

    Args:
        sequence: The sequence whose copies cover the edit.
    """

    def __init__(self, sequence: EditSequence) -> None:
        super().__init__()
        self.sequence = sequence

    def _restore(self) -> None:
        if not self.sequence.restored:
            raise RuntimeError(
                "this edit was applied inside an edit sequence (the sequential protocol's "
                "group), which holds one copy of the weights for all its edits: restore the "
                "sequence, not one of its edits"
            )


class EditorSequences:
    """The edit sequences open on one editor, and the handles its in-place edits get.

    An editor that changes parameters in place owns one and makes its edit handles with
    :meth:`weights_handle`: outside any sequence a :class:`WeightsHandle` (a copy per edit:
    single and batch edits restore each edit bit-exactly); inside the innermost open sequence
    (:meth:`open`), that sequence's single copy.
    """

    def __init__(self) -> None:
        self._open: list[EditSequence] = []

    def open(self) -> EditSequence:
        """Open a sequence; it is the innermost one until it is restored."""
        self._prune()
        sequence = EditSequence()
        self._open.append(sequence)
        return sequence

    def weights_handle(self, params: Sequence[nn.Parameter]) -> EditHandle:
        """The handle of an edit about to change ``params`` in place (call it before).

        Args:
            params: The parameters the edit changes.

        Returns:
            A :class:`WeightsHandle`, or a :class:`CoveredEdit` inside an open sequence.
        """
        self._prune()
        if self._open:
            return self._open[-1].cover(params)
        return WeightsHandle(params)

    def state_handle(self, owner: object, take: Callable[[], EditHandle]) -> EditHandle:
        """The handle of an edit about to change a state that is not a parameter (call it before).

        For an editor whose edits change some other state in place (e.g. WISE's side memory):
        ``take()`` makes a handle that brings the whole of ``owner``'s state back. Outside any
        sequence that handle is returned (one per edit); inside the innermost open sequence it
        is taken once, at the sequence's first edit of ``owner``, and the edit gets a
        :class:`CoveredEdit` holding nothing.

        Args:
            owner: The object whose state the edit changes (identifies the copy in a sequence).
            take: Makes the handle restoring ``owner``'s current state.

        Returns:
            ``take()``'s handle, or a :class:`CoveredEdit` inside an open sequence.
        """
        self._prune()
        if self._open:
            return self._open[-1].cover_state(owner, take)
        return take()

    def _prune(self) -> None:
        """Forget the sequences restored since (innermost first)."""
        self._open = [s for s in self._open if not s.restored]


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
