"""Which Lightning strategy an editor can train or be evaluated under, checked before any work.

Lightning owns distribution (``--config configs/trainer/ddp.yaml`` etc.); this module only
names the strategy family of a Trainer and refuses, in one line, a combination an editor cannot
run — e.g. MEND's functional edit of whole weight matrices under FSDP, whose parameters are
flat shards — instead of a hang or a device-mismatch traceback deep inside a step.
"""

from __future__ import annotations

from typing import Any

SINGLE, DDP, FSDP, DEEPSPEED_2, DEEPSPEED_3, OTHER = (
    "single", "ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3", "other"
)


def strategy_family(strategy: Any) -> str:
    """The family of a Lightning strategy instance.

    Args:
        strategy: ``trainer.strategy``.

    Returns:
        ``"single"`` (one device), ``"ddp"`` (DDP and ddp_spawn: whole weights on every
        process), ``"fsdp"``, ``"deepspeed_stage_2"`` (optimizer states and gradients
        partitioned, whole weights), ``"deepspeed_stage_3"`` (weights partitioned too; also
        stage 1 counts as 2 here) or ``"other"``.
    """
    names = [cls.__name__ for cls in type(strategy).__mro__]
    if "DeepSpeedStrategy" in names:
        return DEEPSPEED_3 if getattr(strategy, "zero_stage_3", False) else DEEPSPEED_2
    if "FSDPStrategy" in names or "ModelParallelStrategy" in names:
        return FSDP
    if "DDPStrategy" in names:
        return DDP
    if "SingleDeviceStrategy" in names:
        return SINGLE
    return OTHER


def check_strategy(editor: Any, strategy: Any, stage: str) -> None:
    """Refuse a strategy the editor declares it cannot run under.

    ``fit`` reads the editor class's ``unsupported_strategies`` (family → why, and what to use
    instead). ``test`` (editing and scoring) needs whole weights on every process: each process
    edits its own copy, so only one device or DDP.

    Args:
        editor: The editor (an :class:`~lit_edit.methods.EditorModule`).
        strategy: ``trainer.strategy``.
        stage: ``"fit"`` or ``"test"``.

    Raises:
        ValueError: naming the editor, the strategy and the alternative.
    """
    family = strategy_family(strategy)
    name = type(editor).__name__
    if stage == "test":
        if family not in (SINGLE, DDP):
            raise ValueError(
                f"{name} cannot be evaluated under {type(strategy).__name__} ({family}): editing "
                "changes whole weight matrices on every process; evaluate with one device or "
                "with --config configs/trainer/ddp.yaml (records sharded across processes)"
            )
        return
    reason = dict(getattr(editor, "unsupported_strategies", {}) or {}).get(family)
    if reason:
        raise ValueError(
            f"{name} cannot train under {type(strategy).__name__} ({family}): {reason}"
        )
