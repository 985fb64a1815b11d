"""train.py / evaluate.py: a user's mistake is one ``error: ...`` line, the traceback on request."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_data_samples import ft_config, zsre_raw

from lit_edit.backbone import BackboneNotFoundError, load_causal_lm
from lit_edit.cli import evaluate_main, train_main
from lit_edit.cli_errors import CheckpointError, ConfigFileError
from lit_edit.records import DataFileError

ROOT = Path(__file__).resolve().parents[1]
FT = str(ROOT / "configs" / "ft" / "tinyfacts.yaml")


def command_line(monkeypatch: pytest.MonkeyPatch, main, *args: str) -> str:
    """Run ``main`` as the command line does (arguments from sys.argv); return the exit line."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *args])
    monkeypatch.delenv("LIT_EDIT_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as info:
        main()
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("error: ") and message.endswith(
        "(LIT_EDIT_TRACEBACK=1 for the traceback)"
    )
    return message


def test_empty_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n\n")
    message = command_line(monkeypatch, evaluate_main, "--config", str(empty))
    assert f"{empty}: the config file is empty" in message
    message = command_line(monkeypatch, train_main, "fit", "--config", str(empty))
    assert f"{empty}: the config file is empty" in message
    with pytest.raises(ConfigFileError):  # from Python: the exception itself
        evaluate_main(["--config", str(empty)])


def test_missing_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = command_line(monkeypatch, evaluate_main, "--config", str(tmp_path / "nope.yaml"))
    assert "nope.yaml: no such config file" in message


def test_empty_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "empty.ckpt"
    ckpt.write_bytes(b"")
    message = command_line(monkeypatch, evaluate_main, "--config", FT, "--ckpt_path", str(ckpt))
    assert f"{ckpt}: not a lit_edit checkpoint (empty file)" in message


def test_truncated_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:1500])
    message = command_line(monkeypatch, evaluate_main, "--config", FT, "--ckpt_path", str(ckpt))
    assert f"{ckpt}: not a lit_edit checkpoint (truncated or not a torch checkpoint" in message
    with pytest.raises(CheckpointError):
        evaluate_main(["--config", FT, "--ckpt_path", str(ckpt)])


def test_not_a_checkpoint_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), ckpt)
    message = command_line(monkeypatch, evaluate_main, "--config", FT, "--ckpt_path", str(ckpt))
    assert f"{ckpt}: not a lit_edit checkpoint (no state_dict in it)" in message


def test_data_error_inside_evaluate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {
        "subject": "Ann",
        "src": "Where does Ann live?",
        "rephrase": "Ann lives in",
        "alt": "",
        "answers": ["Oslo"],
        "loc": "nq question: x",
        "loc_ans": "y",
    }
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([raw]))
    message = command_line(monkeypatch, evaluate_main, "--config", str(ft_config(tmp_path, data)))
    assert f"error: {data}: record 0, field 'alt': is empty" in message


def test_traceback_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "empty.ckpt"
    ckpt.write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--config", FT, "--ckpt_path", str(ckpt)])
    monkeypatch.setenv("LIT_EDIT_TRACEBACK", "1")
    with pytest.raises(CheckpointError):
        evaluate_main()


def test_hub_name_while_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneNotFoundError) as info:
        load_causal_lm("lit-edit-tests/no-such-model")
    text = str(info.value)
    assert "backbone 'lit-edit-tests/no-such-model': not a local directory" in text
    assert "HF_HUB_OFFLINE=1" in text and "give a local directory" in text


def test_hub_name_while_offline_on_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = command_line(
        monkeypatch,
        evaluate_main,
        "--config",
        FT,
        "--model.init_args.backbone",
        "lit-edit-tests/no-such-model",
    )
    assert "backbone 'lit-edit-tests/no-such-model': not a local directory" in message


def test_data_file_error_is_kept_for_python_callers(tmp_path: Path) -> None:
    data = tmp_path / "bad.json"
    data.write_text("[]")
    with pytest.raises(DataFileError, match="contains no records"):
        evaluate_main(["--config", str(ft_config(tmp_path, data))])


def test_evaluate_without_arguments_gives_its_usage(monkeypatch: pytest.MonkeyPatch) -> None:
    message = command_line(monkeypatch, evaluate_main)
    assert "usage: python evaluate.py --config configs/<method>/<dataset>.yaml" in message
    assert "{fit,validate,test,predict}" not in message


def test_unknown_init_argument_in_a_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overlay = tmp_path / "bad.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {"model": {"class_path": "lit_edit.methods.FTEditor", "init_args": {"lrr": 1}}}
        )
    )
    message = command_line(monkeypatch, evaluate_main, "--config", FT, "--config", str(overlay))
    assert (
        "config key 'model.init_args.lrr' is not accepted by lit_edit.methods.FTEditor; "
        "close matches: lr" in message
    )


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (
            "--trainer.max_stepz",
            "unknown option '--trainer.max_stepz'; close matches: --trainer.max_steps",
        ),
        ("--threds", "unknown option '--threds'; close matches: --threads"),
        ("--evaluation.protocl", "close matches: --evaluation.protocol"),
    ],
)
def test_unknown_option_and_its_close_matches(
    option: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = command_line(monkeypatch, evaluate_main, "--config", FT, option, "1")
    assert expected in message


def test_train_without_model_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    message = command_line(monkeypatch, train_main, "fit")
    assert "required" in message


MEND = str(ROOT / "configs" / "mend" / "tinyfacts.yaml")


def _train_overlay(tmp_path: Path, data: Path, model: dict | None = None) -> Path:
    """A 2-step ``fit`` overlay on ``data`` (train and validation), nothing written."""
    config = {
        "trainer": {
            "max_steps": 2, "logger": False, "enable_progress_bar": False, "callbacks": [],
        },
        "data": {
            "class_path": "lit_edit.data.EditDataModule",
            "init_args": {"train_path": str(data), "val_path": str(data), "format": "zsre"},
        },
    }
    if model is not None:
        config["model"] = model
    overlay = tmp_path / "data.yaml"
    overlay.write_text(yaml.safe_dump(config))
    return overlay


def test_train_data_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = {
        "subject": "Ann", "src": "Where does Ann live?", "rephrase": "Where is Ann's home?",
        "alt": "Rome", "answers": ["Oslo"], "loc": "nq question: x", "loc_ans": "y",
    }
    data = tmp_path / "train.json"
    data.write_text(json.dumps([good, {**good, "alt": ""}]))
    overlay = _train_overlay(tmp_path, data)
    message = command_line(
        monkeypatch, train_main, "fit", "--config", MEND, "--config", str(overlay)
    )
    assert f"error: {data}: record 1, field 'alt': is empty" in message


def test_train_unknown_key_and_bad_checkpoint_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = command_line(
        monkeypatch, train_main, "fit", "--config", MEND, "--model.init_args.c_edt", "1"
    )
    assert "'model.init_args.c_edt' is not accepted by lit_edit.methods.MENDEditor" in message
    assert "close matches: c_edit" in message
    ckpt = tmp_path / "cut.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 not a whole zip")
    message = command_line(
        monkeypatch, train_main, "fit", "--config", MEND, "--ckpt_path", str(ckpt)
    )
    assert f"{ckpt}: not a lit_edit checkpoint (truncated or not a torch checkpoint" in message


def _lightning_checkpoint(
    path: Path, state: dict[str, torch.Tensor], class_path: str | None
) -> Path:
    """A checkpoint file as a Lightning Trainer writes it, of the class ``class_path``."""
    hparams = {} if class_path is None else {"_class_path": class_path}
    torch.save(
        {"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.6"},
        path,
    )
    return path


def test_checkpoint_not_written_by_lightning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, ckpt)
    message = command_line(monkeypatch, evaluate_main, "--config", FT, "--ckpt_path", str(ckpt))
    assert f"{ckpt}: not a lit_edit checkpoint (another class: not written by a Lightning" in (
        message
    )


def test_checkpoint_of_a_class_that_is_not_an_editor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _lightning_checkpoint(tmp_path / "lin.ckpt", {"w": torch.zeros(1)}, "torch.nn.Linear")
    args = ["fit", "--config", MEND, "--ckpt_path", str(ckpt)]
    message = command_line(monkeypatch, train_main, *args)
    assert f"{ckpt}: not a lit_edit checkpoint (another class: torch.nn.Linear, not an editor)" in (
        message
    )


def test_checkpoint_of_another_editor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _lightning_checkpoint(
        tmp_path / "mend.ckpt", {"w": torch.zeros(1)}, "lit_edit.methods.MENDEditor"
    )
    message = command_line(monkeypatch, evaluate_main, "--config", FT, "--ckpt_path", str(ckpt))
    assert (
        f"{ckpt} holds a lit_edit.methods.MENDEditor but the config's model is "
        "lit_edit.methods.FTEditor" in message
    )


def test_checkpoint_whose_weights_are_another_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No class saved, foreign weights: torch's multi-line key listing becomes one line."""
    ckpt = _lightning_checkpoint(tmp_path / "other.ckpt", {"layer.weight": torch.zeros(2)}, None)
    args = ["--config", FT, "--ckpt_path", str(ckpt), "--trainer.logger", "false"]
    message = command_line(monkeypatch, evaluate_main, *args)
    assert f"{ckpt}: not a lit_edit checkpoint of FTEditor (another class: " in message
    # the tiny GPT-2's tensors: 2 blocks x 12 (ln_1, attn c_attn/c_proj, ln_2, mlp c_fc/c_proj,
    # each weight and bias) + wte + wpe + ln_f weight and bias + lm_head = 29
    assert "29 of its weights missing" in message
    assert "1 unexpected (e.g. 'layer.weight')" in message
    same_class = _lightning_checkpoint(
        tmp_path / "ft.ckpt", {"layer.weight": torch.zeros(2)}, "lit_edit.methods.FTEditor"
    )
    args[3] = str(same_class)
    message = command_line(monkeypatch, evaluate_main, *args)
    assert f"{same_class}: the FTEditor checkpoint's weights do not fit this config" in message


def test_train_hub_name_while_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = command_line(
        monkeypatch, train_main, "fit", "--config", MEND,
        "--model.init_args.backbone", "lit-edit-tests/no-such-model",
    )
    assert "backbone 'lit-edit-tests/no-such-model': not a local directory" in message
    assert "give a local directory" in message


def test_train_traceback_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "empty.ckpt"
    ckpt.write_bytes(b"")
    argv = ["train.py", "fit", "--config", MEND, "--ckpt_path", str(ckpt)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("LIT_EDIT_TRACEBACK", "1")
    with pytest.raises(CheckpointError, match="empty file"):
        train_main()


def test_evaluate_help_usage_line_is_its_own(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--help"])
    with pytest.raises(SystemExit):
        evaluate_main()
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("usage: evaluate.py [-c CONFIG]"), first
    assert "test" not in first and "{fit,validate,test,predict}" not in first


@pytest.mark.parametrize(
    ("config", "name"),
    [("mend", "MENDEditor"), ("serac", "SERACEditor"), ("lte", "LTEEditor")],
)
def test_trained_editors_refuse_to_evaluate_without_a_checkpoint(
    config: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        sys, "argv", ["evaluate.py", "--config", str(ROOT / "configs" / config / "tinyfacts.yaml")]
    )
    with pytest.raises(SystemExit) as info:
        evaluate_main()
    message = str(info.value.code)
    assert "\n" not in message
    assert message.startswith(f"error: {name} must be trained before it is evaluated")
    assert "--ckpt_path" in message and "--allow_untrained true" in message


def test_hub_name_of_a_scope_classifier_while_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = command_line(
        monkeypatch, train_main, "fit", "--config", str(ROOT / "configs/serac/tinyfacts.yaml"),
        "--model.init_args.classifier", "lit-edit-tests/no-such-encoder",
        "--trainer.logger", "false",
    )
    assert "scope classifier 'lit-edit-tests/no-such-encoder': not a local directory" in message
    assert "give a local directory" in message and "as the scope classifier" in message


def test_hub_name_of_a_sentence_encoder_while_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from lit_edit.nn.encoders import SentenceEncoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneNotFoundError) as info:
        SentenceEncoder("lit-edit-tests/no-such-encoder").encode(["a"])
    assert str(info.value).startswith(
        "sentence encoder 'lit-edit-tests/no-such-encoder': not a local directory"
    )


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"trainr": {"max_steps": 3}},
            "config key 'trainr.max_steps' is not accepted; close matches: trainer.max_steps",
        ),
        (
            {"trainer": {"max_stepz": 3}},
            "config key 'trainer.max_stepz' is not accepted; close matches: trainer.max_steps",
        ),
        (
            {"evaluation": {"protocl": None}},
            "config key 'evaluation.protocl' is not accepted; close matches: evaluation.protocol",
        ),
    ],
)
def test_unknown_key_of_a_config_file_and_its_close_matches(
    settings: dict, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overlay = tmp_path / "typo.yaml"
    overlay.write_text(yaml.safe_dump(settings))
    message = command_line(monkeypatch, evaluate_main, "--config", FT, "--config", str(overlay))
    assert expected in message and "Subcommand 'test'" not in message
    args = ["fit", "--config", MEND, "--config", str(overlay)]
    assert expected in command_line(monkeypatch, train_main, *args)


def test_unknown_top_level_option_is_matched_by_its_first_part(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = command_line(monkeypatch, evaluate_main, "--config", FT, "--modl.init_args.lr", "1")
    assert "unknown option '--modl.init_args.lr'; close matches: --model.init_args.lr" in message


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"model": {"class_path": "lit_edit.methods.FTEditr"}},
            "config key 'model.class_path': lit_edit.methods has no class 'FTEditr'; close "
            "matches: lit_edit.methods.FTEditor",
        ),
        (
            {"model": {"init_args": {"lr": "abc"}}},
            "config key 'model.init_args.lr': expected a float, got 'abc'",
        ),
        (
            {"trainer": {"max_steps": "abc"}},
            "config key 'trainer.max_steps': expected an int, got 'abc'",
        ),
    ],
)
def test_unknown_class_and_wrong_value_type_are_one_line(
    settings: dict, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overlay = tmp_path / "bad.yaml"
    overlay.write_text(yaml.safe_dump(settings))
    message = command_line(monkeypatch, evaluate_main, "--config", FT, "--config", str(overlay))
    assert expected in message and "Union subtypes" not in message


def test_train_max_length_too_short_for_an_answer_fails_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = zsre_raw()
    long_answer = " ".join(["Rome"] * 30)  # at least 30 tokens: more than max_length 12
    data = tmp_path / "train.json"
    data.write_text(json.dumps([good, good, {**good, "loc_ans": long_answer}]))
    overlay = _train_overlay(tmp_path, data, {"init_args": {"max_length": 12}})
    message = command_line(
        monkeypatch, train_main, "fit", "--config", MEND, "--config", str(overlay)
    )
    assert f"error: {data}: record 2: train split: max_length=12 leaves no room" in message
    assert "raise the method's max_length (now 12)" in message


def test_train_long_records_skip_leaves_them_out_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = zsre_raw()
    data = tmp_path / "train.json"
    data.write_text(json.dumps([good, {**good, "loc_ans": " ".join(["Rome"] * 30)}, good]))
    overlay = _train_overlay(
        tmp_path, data, {"init_args": {"max_length": 12, "long_records": "skip"}}
    )
    with caplog.at_level("WARNING", logger="lit_edit.methods.base"):
        cli = train_main(["fit", "--config", MEND, "--config", str(overlay)])
    assert cli.trainer.global_step == 2
    assert [r.index for r in cli.datamodule.records["train"]] == [0, 2]
    assert "train split: left out 1 of 3 records" in caplog.text
    assert "record indices [1]" in caplog.text
