"""Strategy families and the start-time refusals of what an editor cannot run under."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from lit_edit.methods import FTEditor, LTEEditor, MENDEditor, SERACEditor
from lit_edit.strategies import check_strategy, strategy_family


class DeepSpeedStrategy:
    """Stands in for Lightning's (deepspeed is not installed here); named like it."""

    def __init__(self, stage_3: bool) -> None:
        self.zero_stage_3 = stage_3


def test_families_of_lightning_strategies() -> None:
    assert strategy_family(SingleDeviceStrategy("cpu")) == "single"
    assert strategy_family(DDPStrategy()) == "ddp"
    assert strategy_family(FSDPStrategy()) == "fsdp"
    assert strategy_family(DeepSpeedStrategy(stage_3=False)) == "deepspeed_stage_2"
    assert strategy_family(DeepSpeedStrategy(stage_3=True)) == "deepspeed_stage_3"
    assert strategy_family(object()) == "other"


@pytest.mark.parametrize("strategy", [FSDPStrategy(), DeepSpeedStrategy(stage_3=True)])
def test_mend_refuses_to_train_with_sharded_weights(strategy: object) -> None:
    editor = MENDEditor.__new__(MENDEditor)  # the refusal reads only the class
    with pytest.raises(ValueError, match=r"MENDEditor cannot train under .*: .*use .*(DDP|ddp)"):
        check_strategy(editor, strategy, "fit")


@pytest.mark.parametrize("editor_class", [MENDEditor, LTEEditor, SERACEditor])
def test_whole_weight_strategies_are_accepted_for_training(editor_class: type) -> None:
    editor = editor_class.__new__(editor_class)
    for strategy in (SingleDeviceStrategy("cpu"), DDPStrategy(), DeepSpeedStrategy(False)):
        check_strategy(editor, strategy, "fit")  # no error


def test_evaluation_needs_whole_weights_on_every_process() -> None:
    editor = FTEditor.__new__(FTEditor)
    check_strategy(editor, DDPStrategy(), "test")
    with pytest.raises(ValueError, match="FTEditor cannot be evaluated under FSDPStrategy"):
        check_strategy(editor, FSDPStrategy(), "test")
    with pytest.raises(ValueError, match=r"configs/trainer/ddp.yaml"):
        check_strategy(editor, DeepSpeedStrategy(stage_3=False), "test")
