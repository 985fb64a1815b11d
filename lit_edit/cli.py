"""Command-line entry points ``train.py`` and ``evaluate.py``, on LightningCLI.

``train.py`` runs LightningCLI ``fit``/``validate``/``test``; ``evaluate.py`` runs ``test``.
Both use subclass mode: the editor class, the data and the evaluation settings come from YAML
configs (``configs/<method>/<dataset>.yaml``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.core import LightningDataModule

import lit_edit.data.datamodule  # noqa: F401  (registers the DataModules for short class names)
import lit_edit.data.tinyfacts  # noqa: F401
from lit_edit.cli_errors import (
    ConfigFileError,
    check_checkpoint_class,
    check_config_files,
    one_line_errors,
    read_checkpoint,
    weights_mismatch,
)
from lit_edit.evaluation import Evaluation
from lit_edit.links import connect
from lit_edit.methods import EditorModule
from lit_edit.strategies import check_strategy

log = logging.getLogger(__name__)


class LoggedConfigSaver(SaveConfigCallback):
    """Save the run's config into the logger's folder, and nowhere when the run has no logger.

    (Lightning's default writes ``config.yaml`` into the working directory when logging is off.)
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Save the config only when a logger gives the run a folder."""
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


def _show_progress_logs() -> None:
    """Print lit_edit's INFO logs (e.g. the one-time TinyFacts build, skipped records) to stderr.

    Only when the ``lit_edit`` logger has no handler yet, so an application's own logging setup
    is left alone.
    """
    logger = logging.getLogger("lit_edit")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class LitEditCLI(LightningCLI):
    """LightningCLI for editors: any :class:`EditorModule` subclass and any DataModule.

    It adds the top-level ``evaluation`` settings (protocol, scorer, metrics, results folder)
    used by ``test``.

    Args:
        args: Command-line arguments (``None`` reads ``sys.argv``).
        test_prog: The program name of the ``test`` subcommand's usage line (``evaluate.py``
            runs only ``test`` and prints ``usage: evaluate.py ...``); ``None``: Lightning's.
        **kwargs: Passed to :class:`~lightning.pytorch.cli.LightningCLI`.
    """

    def __init__(
        self, args: Sequence[str] | None = None, test_prog: str | None = None, **kwargs: object
    ) -> None:
        self._test_prog = test_prog
        _show_progress_logs()
        # Lightning warnings that are by design here, silenced so that real ones stand out:
        # EditorModule and EditDataModule both move record batches safely (same function);
        # editors tokenize in their own `on_before_batch_transfer`; frozen backbones stay in
        # eval mode while the editor trains; train.py/evaluate.py pass sys.argv on as `args`;
        # the evaluation's test/ values are computed over every process before they are logged.
        for message in (
            ".*overridden `transfer_batch_to_device`.*",
            ".*overridden `on_before_batch_transfer`.*",
            r".*module\(s\) in eval mode at the start of training.*",
            ".*LightningCLI's args parameter is intended to run from within Python.*",
            r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # inside Lightning itself
            r".*self\.log\('test/.*sync_dist=True.*",
        ):
            warnings.filterwarnings("ignore", message=message)
        # one device unless a config says otherwise (configs/trainer/*.yaml): Lightning's
        # "auto" would start a DDP run on every GPU of the machine
        kwargs.setdefault("trainer_defaults", {"devices": 1})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", LoggedConfigSaver)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(EditorModule, LightningDataModule, args=args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path``, keep the config's settings; warn where the checkpoint differs.

        Lightning's default replaces the editor's init arguments by the hyperparameters saved in
        the checkpoint, which silently drops settings given in the config or on the command line
        (e.g. LTE's ``threshold`` or ``top_k`` at evaluation). Here the config wins: each init
        argument whose value differs from the checkpoint's is logged as a warning (a changed
        architecture then fails loudly when the weights load).

        Raises:
            ValueError: if the checkpoint holds another editor class than the config.
        """
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        saved = dict(read_checkpoint(ckpt_path).get("hyper_parameters") or {})
        saved.pop("_instantiator", None)
        saved_class = saved.pop("_class_path", None)
        model = _plain(config.get("model")) or {}
        if model.get("class_path"):
            check_checkpoint_class(ckpt_path, saved_class, model["class_path"])
        init_args = model.get("init_args") or {}
        for key in sorted(saved):
            if key in init_args and _plain(init_args[key]) != saved[key]:
                log.warning(
                    "%s was trained with %s=%r; this run uses %s=%r (from the config)",
                    ckpt_path, key, saved[key], key, _plain(init_args[key]),
                )

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        """Build the parser; ``evaluate.py``'s usage line is its own, not ``[options] test``.

        Args:
            add_subcommands: Whether the parser has subcommands (always, here).
            main_kwargs: Arguments of the main parser.
            subparser_kwargs: Arguments of the subcommand parsers.
        """
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if self._test_prog is not None and add_subcommands:
            self._subcommand_parsers["test"].prog = self._test_prog

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand; weights of a checkpoint that do not fit the editor: one line.

        Raises:
            CheckpointError: when ``--ckpt_path``'s weights do not load into the editor.
        """
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as e:
            ckpt_path = self.config[subcommand].get("ckpt_path")
            if not ckpt_path or "Error(s) in loading state_dict" not in str(e):
                raise
            raise weights_mismatch(ckpt_path, read_checkpoint(ckpt_path), self.model) from e

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        """Add the top-level ``evaluation`` group and the ``threads`` setting.

        ``evaluation``: see :class:`~lit_edit.evaluation.Evaluation`. ``threads``: the number of
        torch CPU threads for the whole run, set before the editor and the data are built
        (``null``: torch's default, all cores). The thread count changes floating-point results,
        so every config whose figures are published fixes it; ``summary.json`` records it.
        ``allow_untrained``: let ``test`` score an editor whose class sets
        :attr:`~lit_edit.methods.EditorModule.needs_training` without a checkpoint.
        """
        parser.add_class_arguments(Evaluation, "evaluation")
        parser.add_argument("--threads", type=int | None, default=None,
                            help="torch CPU threads for the run (null: torch's default)")
        parser.add_argument(
            "--allow_untrained", type=bool, default=False,
            help="evaluate an editor that must be trained (MEND, ...) without --ckpt_path, "
            "i.e. its untrained network (a warning says so); without it, that is refused",
        )

    def before_instantiate_classes(self) -> None:
        """Refuse to test an untrained editor, and set the thread count, before anything is built.

        Raises:
            SystemExit: with one line, when ``test`` runs an editor whose class
                ``needs_training`` without ``--ckpt_path`` and without ``--allow_untrained``.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "test":
            _check_trained(config)
        threads = config.get("threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)

    def before_fit(self) -> None:
        """Refuse, in one line, a strategy the editor cannot train under."""
        check_strategy(self.model, self.trainer.strategy, "fit")

    def before_test(self) -> None:
        """Refuse a strategy editing cannot run under; hold the report back for Lightning's table.

        The editing report is printed after Lightning's table of test metrics.
        """
        check_strategy(self.model, self.trainer.strategy, "test")
        self.model.defer_report = True

    def after_test(self) -> None:
        """Print the editing report (KnowEdit-layout table, pre/post table, results folder)."""
        from lit_edit.evaluation_loop import EvaluationLoop

        for callback in self.trainer.callbacks:
            if isinstance(callback, EvaluationLoop) and callback.report is not None:
                print(callback.report)

    def after_instantiate_classes(self) -> None:
        """Hand the evaluation settings to the editor; connect the editor and its data module."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        self.model.evaluation = config["evaluation"]
        connect(self.model, self.datamodule)


def _check_trained(config: Any) -> None:
    """Stop a ``test`` run of an editor that must be trained but has no checkpoint.

    Args:
        config: The ``test`` subcommand's parsed config.

    Raises:
        SystemExit: with one line naming the editor and the two ways on.
    """
    if config.get("ckpt_path"):
        return
    model = _plain(config.get("model")) or {}
    class_path = model.get("class_path") if isinstance(model, dict) else None
    if not class_path:
        return
    module_name, _, name = str(class_path).rpartition(".")
    editor = getattr(importlib.import_module(module_name), name, None)
    if not getattr(editor, "needs_training", False):
        return
    if config.get("allow_untrained"):
        warnings.warn(
            f"evaluating {name} without a checkpoint (--allow_untrained true): what it learns "
            "in train.py fit is scored as it is now (untrained, or trained elsewhere)",
            UserWarning,
            stacklevel=2,
        )
        return
    raise SystemExit(
        f"error: {name} must be trained before it is evaluated: give --ckpt_path "
        "(a checkpoint written by train.py fit), or --allow_untrained true to score the "
        "untrained editor"
    )


def _plain(value: Any) -> Any:
    """A parsed config value as plain Python (jsonargparse namespaces become dicts)."""
    as_dict = getattr(value, "as_dict", None)
    return as_dict() if callable(as_dict) else value


def train_main(args: Sequence[str] | None = None) -> LitEditCLI:
    """``train.py``: ``fit`` (train an editor), ``validate`` or ``test`` from a config.

    Args:
        args: Arguments after the program name, e.g.
            ``["fit", "--config", "configs/mend/tinyfacts.yaml"]``.

    Returns:
        The CLI object (its ``trainer``, ``model`` and ``datamodule`` after the run).
    """
    argv = list(sys.argv[1:] if args is None else args)
    with one_line_errors(enabled=args is None), _restored_threads():
        check_config_files(argv)
        return LitEditCLI(args=argv, **_command_line_parsing(args is None))


def evaluate_main(args: Sequence[str] | None = None) -> LitEditCLI:
    """``evaluate.py``: run an editing protocol (LightningCLI ``test``) and write the results.

    Args:
        args: Arguments after the program name, e.g.
            ``["--config", "configs/ft/tinyfacts.yaml"]`` (add ``--ckpt_path`` for a trained
            editor; an editor that must be trained, such as MEND, is refused without it unless
            ``--allow_untrained true`` is given).

    Returns:
        The CLI object.
    """
    argv = list(sys.argv[1:] if args is None else args)
    with one_line_errors(enabled=args is None), _restored_threads():
        if not argv:
            raise ConfigFileError(
                "no config given; usage: python evaluate.py --config "
                "configs/<method>/<dataset>.yaml [--ckpt_path CKPT] [--<section>.<key> VALUE ...]"
                " (python evaluate.py --help lists every option)"
            )
        check_config_files(argv)
        return LitEditCLI(
            args=["test", *argv], test_prog="evaluate.py", **_command_line_parsing(args is None)
        )


def _command_line_parsing(enabled: bool) -> dict[str, Any]:
    """On the command line, parse errors are raised (then printed in one line), not printed."""
    return {"parser_kwargs": {"exit_on_error": False}} if enabled else {}


@contextlib.contextmanager
def _restored_threads() -> Iterator[None]:
    """Give the caller its torch thread count back after a run that set ``threads``."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)
