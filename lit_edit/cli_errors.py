"""Errors of the command line: bad checkpoints, bad config files, and one-line messages.

``one_line_errors`` turns the user's mistakes (a data, config, checkpoint or backbone error)
into one ``error: ...`` line at the command line; ``LIT_EDIT_TRACEBACK=1`` keeps the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer

from lit_edit.evaluation import Evaluation


class CheckpointError(ValueError):
    """A ``--ckpt_path`` that is not a lit_edit checkpoint (empty, truncated, another class)."""


class ConfigFileError(ValueError):
    """A ``--config`` file that cannot be used (missing or empty)."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's contents (tensors and plain values only) on the CPU.

    Args:
        path: The checkpoint file.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: naming the path when the file is empty, truncated or not a checkpoint.
    """
    p = Path(path)
    if p.stat().st_size == 0:
        raise CheckpointError(f"{path}: not a lit_edit checkpoint (empty file)")
    try:
        saved = torch.load(p, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001  (whatever torch.load fails with, on any bytes)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a lit_edit checkpoint (truncated or not a torch checkpoint: {reason})"
        ) from e
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise CheckpointError(f"{path}: not a lit_edit checkpoint (no state_dict in it)")
    return saved


def check_config_files(args: Sequence[str]) -> None:
    """Refuse ``--config`` files that are missing or hold no setting, before parsing.

    Args:
        args: The command-line arguments.

    Raises:
        ConfigFileError: naming the file.
    """
    paths = [b for a, b in zip(args, args[1:], strict=False) if a == "--config"]
    paths += [a.removeprefix("--config=") for a in args if a.startswith("--config=")]
    for path in paths:
        p = Path(path)
        if not p.is_file():
            if "\n" in path or ":" in path:  # an inline YAML string, not a path
                continue
            raise ConfigFileError(f"{path}: no such config file")
        text = p.read_text(encoding="utf-8")
        if not any(line.split("#", 1)[0].strip() for line in text.splitlines()):
            raise ConfigFileError(
                f"{path}: the config file is empty (give e.g. configs/ft/tinyfacts.yaml, or "
                "settings such as 'model:' and 'data:')"
            )


def _parameters(target: Any) -> list[str]:
    """The init argument names of a class (over its bases), for close-match suggestions."""
    names: list[str] = []
    for klass in getattr(target, "__mro__", (target,)):
        init = getattr(klass, "__init__", None)
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            continue
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        names += [n for n, q in params.items() if n != "self" and q.kind not in variadic]
    return list(dict.fromkeys(names))


def _import(class_path: str) -> Any:
    """The class named by a dotted path, or ``None``."""
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return None


def config_error_line(message: str) -> str:
    """One line for a config/argument parse error: the key and its close matches.

    Args:
        message: The parser's (multi-line) message.

    Returns:
        ``"config key 'model.init_args.lrr' is not accepted by lit_edit.methods.FTEditor; close
        matches: lr"`` for an unknown init argument, ``"unknown option '--trainer.max_stepz';
        close matches: --trainer.max_steps"`` for an unknown option, else the message's lines
        joined.
    """
    option = re.search(r"Option '([^']+)' is not accepted", message)
    section = re.search(r'Parser key "([^"]+)"', message)
    class_path = re.search(r"class_path '([^']+)'", message)
    if option and class_path:
        where = f"{section.group(1)}.init_args." if section else ""
        known = _parameters(_import(class_path.group(1)))
        close = difflib.get_close_matches(option.group(1), known, n=3)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        return (
            f"config key '{where}{option.group(1)}' is not accepted by "
            f"{class_path.group(1)}{hint}"
        )
    unknown = re.search(r"unrecognized arguments: (--[^\s=]+)", message)
    if unknown:
        key = unknown.group(1).removeprefix("--")
        head, _, last = key.rpartition(".")
        owners = {"trainer": Trainer, "evaluation": Evaluation}
        if head in owners:
            known = [f"{head}.{n}" for n in _parameters(owners[head])]
        else:
            known = [
                "config", "seed_everything", "trainer", "model", "data", "evaluation", "threads",
                "allow_untrained", "ckpt_path", "optimizer", "lr_scheduler",
            ]
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"; close matches: {', '.join('--' + c for c in close)}" if close else ""
        return f"unknown option '--{key}'{hint}"
    return " ".join(message.split())


def _user_error(error: BaseException) -> BaseException | None:
    """The first error of ``error``'s chain that is the user's to fix (one line is enough)."""
    from lit_edit.backbone import BackboneNotFoundError
    from lit_edit.records import DataFileError
    from lit_edit.sharding import ShardingError

    kinds = (
        DataFileError, CheckpointError, ConfigFileError, BackboneNotFoundError, ShardingError,
        argparse.ArgumentError,
    )
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _is_rank_zero() -> bool:
    """Whether this is rank 0 of a multi-process run (or a single process).

    From the process group when there is one, else from the ``NODE_RANK``/``LOCAL_RANK``
    variables Lightning's launcher sets for the processes it starts.
    """
    from lit_edit.sharding import world_and_rank

    world_size, rank = world_and_rank()
    if world_size > 1:
        return rank == 0
    return all(os.environ.get(k, "0") in ("", "0") for k in ("NODE_RANK", "LOCAL_RANK"))


@contextlib.contextmanager
def one_line_errors(enabled: bool = True) -> Iterator[None]:
    """Turn a data, config, checkpoint or backbone error into one ``error: ...`` line and exit 1.

    Set the environment variable ``LIT_EDIT_TRACEBACK=1`` to get the full traceback instead. In a
    multi-process run only rank 0 prints the line (every process exits with status 1).

    Args:
        enabled: Whether to convert (the command line); Python callers get the exception.

    Raises:
        SystemExit: with the error's one-line message.
    """
    try:
        yield
    except Exception as e:
        found = _user_error(e) if enabled else None
        if found is None or os.environ.get("LIT_EDIT_TRACEBACK", "") not in ("", "0"):
            raise
        if not _is_rank_zero():  # the other processes of a multi-process run fail the same way
            raise SystemExit(1) from e
        if isinstance(found, argparse.ArgumentError):
            message = config_error_line(str(found))
        else:
            message = " ".join(str(found).split("\n")[0].split())
        raise SystemExit(f"error: {message} (LIT_EDIT_TRACEBACK=1 for the traceback)") from e
