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
import time
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
    if "pytorch-lightning_version" not in saved:
        raise CheckpointError(
            f"{path}: not a lit_edit checkpoint (another class: not written by a Lightning "
            "Trainer, no 'pytorch-lightning_version' in it)"
        )
    return saved


def check_checkpoint_class(path: str | Path, saved_class: str | None, config_class: str) -> None:
    """Refuse a checkpoint whose saved class is not an editor, or not the config's editor.

    Args:
        path: The checkpoint file.
        saved_class: The ``_class_path`` saved in its hyperparameters (``None``: not saved).
        config_class: The config's ``model.class_path``.

    Raises:
        CheckpointError: naming the path and both classes.
    """
    from lit_edit.methods import EditorModule

    if not saved_class or saved_class == config_class:
        return
    saved = _import(saved_class)
    if not (isinstance(saved, type) and issubclass(saved, EditorModule)):
        raise CheckpointError(
            f"{path}: not a lit_edit checkpoint (another class: {saved_class}, not an editor)"
        )
    raise CheckpointError(
        f"{path} holds a {saved_class} but the config's model is {config_class}: evaluate it "
        "with that editor's config"
    )


def weights_mismatch(
    path: str | Path, saved: dict[str, Any], model: torch.nn.Module
) -> CheckpointError:
    """The one-line error for a checkpoint whose weights do not fit the configured editor.

    Args:
        path: The checkpoint file.
        saved: Its contents (:func:`read_checkpoint`).
        model: The editor the weights were loaded into.

    Returns:
        ``"<path>: not a lit_edit checkpoint of X (another class: ...)"`` when the checkpoint
        does not name ``X`` as its class, else an error saying the settings differ; both give
        the number of missing and unexpected weights and the first of each.
    """
    name = type(model).__name__
    expected, found = set(model.state_dict()), set(saved.get("state_dict") or {})
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    counts = (
        f"{len(missing)} of its weights missing{f' (e.g. {missing[0]!r})' if missing else ''}, "
        f"{len(unexpected)} unexpected{f' (e.g. {unexpected[0]!r})' if unexpected else ''}"
    )
    saved_class = (saved.get("hyper_parameters") or {}).get("_class_path")
    if saved_class and saved_class.rpartition(".")[2] == name:
        return CheckpointError(
            f"{path}: the {name} checkpoint's weights do not fit this config ({counts}): use the "
            "settings it was trained with"
        )
    return CheckpointError(f"{path}: not a lit_edit checkpoint of {name} (another class: {counts})")


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
        close matches: --trainer.max_steps"`` for an unknown option, ``"config key
        'trainr.max_steps' is not accepted; close matches: trainer.max_steps"`` for an unknown
        key of a config file, ``"config key 'model.class_path': lit_edit.methods has no class
        'FTEditr'; close matches: lit_edit.methods.FTEditor"`` for an unknown class, ``"config
        key 'model.init_args.lr': expected a float, got 'abc'"`` for a value of the wrong type,
        else the message's lines joined.
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
    missing = re.search(
        r"class_path '[^']+':\s+module '([^']+)' has no attribute '([^']+)'", message
    )
    if missing:
        module_name, name = missing.groups()
        module = importlib.import_module(module_name)
        known = [n for n, v in vars(module).items() if isinstance(v, type)]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; close matches: {', '.join(f'{module_name}.{c}' for c in close)}" if close else ""
        where = f"{section.group(1)}.class_path" if section else "class_path"
        return f"config key '{where}': {module_name} has no class {name!r}{hint}"
    value = re.search(r"Expected a <class '([^']+)'>\. Got value: ([^\n]*)", message)
    if value:
        keys = re.findall(r'Parser key "([^"]+)"', message)
        key = keys[0] if len(keys) < 2 else f"{keys[0]}.init_args.{keys[-1]}"
        kind, given = value.group(1), value.group(2).strip()
        return f"config key '{key}': expected {_article(kind)} {kind}, got {given!r}"
    unknown = re.search(r"unrecognized arguments: (--[^\s=]+)", message)
    if unknown:
        key = unknown.group(1).removeprefix("--")
        close = _close_keys(key)
        hint = f"; close matches: {', '.join('--' + c for c in close)}" if close else ""
        return f"unknown option '--{key}'{hint}"
    in_file = re.search(r"Subcommand '[^']+' does not accept option '([^']+)'", message)
    if in_file:  # a key of a config file
        key = in_file.group(1)
        close = _close_keys(key)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        return f"config key '{key}' is not accepted{hint}"
    return " ".join(message.split())


def _article(word: str) -> str:
    """``"an"`` before a vowel, else ``"a"``."""
    return "an" if word[:1] in "aeiou" else "a"


def _close_keys(key: str) -> list[str]:
    """Known keys close to an unknown dotted config key (at most three).

    ``trainer.<x>`` and ``evaluation.<x>`` are matched against the Trainer's and
    :class:`~lit_edit.evaluation.Evaluation`'s arguments; any other key against the top-level
    keys, by its first part (``trainr.max_steps`` → ``trainer.max_steps``).
    """
    head, _, _ = key.rpartition(".")
    owners = {"trainer": Trainer, "evaluation": Evaluation}
    if head in owners:
        known = [f"{head}.{n}" for n in _parameters(owners[head])]
        return difflib.get_close_matches(key, known, n=3)
    top_level = (
        "config", "seed_everything", "trainer", "model", "data", "evaluation", "threads",
        "allow_untrained", "ckpt_path", "optimizer", "lr_scheduler",
    )
    first, dot, rest = key.partition(".")
    close = difflib.get_close_matches(first, top_level, n=3)
    return [f"{c}{dot}{rest}" for c in close if c != first]


def _user_error(error: BaseException) -> BaseException | None:
    """The first error of ``error``'s chain that is the user's to fix (one line is enough)."""
    from lit_edit.backbone import BackboneNotFoundError
    from lit_edit.evaluation_resume import ResultsFolderError
    from lit_edit.records import DataFileError
    from lit_edit.sharding import ShardingError

    kinds = (
        DataFileError, CheckpointError, ConfigFileError, BackboneNotFoundError, ShardingError,
        ResultsFolderError, argparse.ArgumentError,
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
def one_line_errors(enabled: bool = True, rank_exit_delay: float = 5.0) -> Iterator[None]:
    """Turn a data, config, checkpoint or backbone error into one ``error: ...`` line and exit 1.

    Set the environment variable ``LIT_EDIT_TRACEBACK=1`` to get the full traceback instead. In a
    multi-process run only rank 0 prints the line (every process exits with status 1).

    Args:
        enabled: Whether to convert (the command line); Python callers get the exception.
        rank_exit_delay: Seconds a process other than rank 0 waits before it exits, so that
            rank 0 prints the line before the launcher stops the run.

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
            # Lightning's launcher kills every process (SIGKILL) as soon as a child exits with
            # an error: leave rank 0 the time to print the line first
            time.sleep(rank_exit_delay)
            raise SystemExit(1) from e
        if isinstance(found, argparse.ArgumentError):
            message = config_error_line(str(found))
        else:
            message = " ".join(str(found).split("\n")[0].split())
        raise SystemExit(f"error: {message} (LIT_EDIT_TRACEBACK=1 for the traceback)") from e
