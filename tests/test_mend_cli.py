"""MEND through the real entry points: train.py fit, checkpoints, resume, early stop, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_mend import WORDS, make_backbone

from lit_edit.cli import evaluate_main, train_main
from lit_edit.methods import MENDEditor

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "mend").glob("*.yaml"))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_backbone(tmp_path_factory.mktemp("mend_cli") / "gpt2", "gpt2"))


@pytest.fixture(scope="module")
def zsre(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ZsRE-format file of 30 records about the tiny model's words."""
    names, cities = WORDS[:10], ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Baku"]
    rows = []
    for i in range(30):
        name, old, new = names[i % 10], cities[i % 6], cities[(i + 1 + i // 10) % 6]
        rows.append(
            {
                "subject": name,
                "src": f"where was {name} born",
                "pred": old,
                "rephrase": f"{name} was born in the city of",
                "alt": new,
                "answers": [old],
                "loc": f"nq question: what language {names[(i + 3) % 10]} speaks",
                "loc_ans": ["French", "Latin", "Norse"][i % 3],
                "cond": "",
            }
        )
    path = tmp_path_factory.mktemp("mend_data") / "zsre.json"
    path.write_text(json.dumps(rows))
    return str(path)


def write_config(tmp: Path, backbone: str, data: str, **model: object) -> tuple[Path, Path]:
    """A tiny fit+evaluate config in the shape of configs/mend/tinyfacts.yaml."""
    ckpt = tmp / "checkpoints"
    init = {"backbone": backbone, "rank": 8, "lr": 1e-3, "lr_lr": 1e-2, "edit_lr": 1e-2}
    init.update(model)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 6,
            "val_check_interval": 3,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 3,
            "num_sanity_val_steps": 0,
            "gradient_clip_val": 100.0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp / "runs"), "name": "mend"},
            },
            "callbacks": [
                {"class_path": "lit_edit.callbacks.TorchThreads", "init_args": {"num_threads": 1}},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(ckpt),
                        "filename": "best",
                        "monitor": "val/edit_success",
                        "mode": "max",
                        "save_last": True,
                        "enable_version_counter": False,
                    },
                },
                {
                    "class_path": "lightning.pytorch.callbacks.EarlyStopping",
                    "init_args": {"monitor": "val/edit_success", "mode": "max", "patience": 2},
                },
            ],
        },
        "model": {"class_path": "lit_edit.methods.MENDEditor", "init_args": init},
        "data": {
            "class_path": "lit_edit.data.EditDataModule",
            "init_args": {
                "path": data,
                "val_fraction": 0.2,
                "test_fraction": 0.2,
                "eval_batch_size": 1,
            },
        },
        "evaluation": {
            "protocol": {"class_path": "lit_edit.protocols.SingleEdit"},
            "exact_match": False,
            "verify_restore": True,
            "results_dir": str(tmp / "results"),
        },
    }
    path = tmp / "mend.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, ckpt


def test_fit_checkpoints_best_and_last_then_evaluate_loads_the_editor(
    backbone: str, zsre: str, tmp_path: Path
) -> None:
    config, ckpt = write_config(tmp_path, backbone, zsre, lr_schedule="cosine")
    cli = train_main(["fit", "--config", str(config)])
    assert cli.trainer.global_step == 6
    assert (ckpt / "best.ckpt").is_file() and (ckpt / "last.ckpt").is_file()
    saved = torch.load(ckpt / "best.ckpt", weights_only=False)
    assert saved["lit_edit_class"] == "lit_edit.methods.mend.MENDEditor"
    assert not any(k.startswith("model.") for k in saved["state_dict"])
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard log"

    trained = cli.model.network.state_dict()
    result = evaluate_main(["--config", str(config), "--ckpt_path", str(ckpt / "best.ckpt")])
    assert isinstance(result.model, MENDEditor)
    best = torch.load(ckpt / "best.ckpt", weights_only=False)["state_dict"]
    for key, value in result.model.network.state_dict().items():
        assert torch.equal(value, best[f"network.{key}"])
    assert set(trained) == {k.removeprefix("network.") for k in best if k.startswith("network.")}
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["n_records"] == 6
    assert summary["method"].endswith("MENDEditor")
    for metric in ("reliability", "generalization", "locality"):
        assert 0.0 <= summary[metric] <= 1.0


def test_evaluate_refuses_an_untrained_mend_in_one_line(
    backbone: str, zsre: str, tmp_path: Path
) -> None:
    config, _ = write_config(tmp_path, backbone, zsre)
    with pytest.raises(SystemExit) as info:
        evaluate_main(["--config", str(config)])
    message = str(info.value.code)
    assert "\n" not in message
    assert message.startswith("error: MENDEditor must be trained before it is evaluated")
    assert "--ckpt_path" in message and "--allow_untrained true" in message
    assert not (tmp_path / "results").exists()


def test_evaluate_untrained_mend_when_asked_warns(backbone: str, zsre: str, tmp_path: Path) -> None:
    config, _ = write_config(tmp_path, backbone, zsre)
    with pytest.warns(UserWarning, match="evaluating MENDEditor without a checkpoint"):
        result = evaluate_main(["--config", str(config), "--allow_untrained", "true"])
    assert isinstance(result.model, MENDEditor)
    assert json.loads((tmp_path / "results" / "summary.json").read_text())["n_records"] == 6


def test_resuming_a_killed_run_continues(backbone: str, zsre: str, tmp_path: Path) -> None:
    config, ckpt = write_config(tmp_path, backbone, zsre)
    train_main(["fit", "--config", str(config), "--trainer.max_steps", "3"])  # "killed" at 3
    first = torch.load(ckpt / "last.ckpt", weights_only=False)
    assert first["global_step"] == 3
    cli = train_main(["fit", "--config", str(config), "--ckpt_path", str(ckpt / "last.ckpt")])
    assert cli.trainer.global_step == 6
    resumed = torch.load(ckpt / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 6
    adam = resumed["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == 6 for s in adam.values())  # the optimizer state continued


def test_early_stopping_really_stops(backbone: str, zsre: str, tmp_path: Path) -> None:
    config, _ = write_config(tmp_path, backbone, zsre, lr=0.0, lr_lr=0.0)  # nothing improves
    cli = train_main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps",
            "60",
            "--trainer.val_check_interval",
            "2",
        ]
    )
    stopper = next(c for c in cli.trainer.callbacks if type(c).__name__ == "EarlyStopping")
    assert cli.trainer.should_stop
    assert stopper.wait_count >= 2
    assert cli.trainer.global_step < 60


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", str(path)]
    if path.stem in ("gpt2-xl", "llama-2-7b"):  # model overlays go on top of a data config
        args = ["fit", "--config", str(REPO / "configs/mend/zsre.yaml"), "--config", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        train_main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].endswith("MENDEditor")
    header = path.read_text().splitlines()[0]
    assert header.startswith("# python "), f"{path.name}: the first line must be its command"


SHARED = REPO.parent / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared reference data not found at {SHARED}")
@pytest.mark.parametrize("name", ["zsre", "counterfact"])
def test_shipped_real_data_configs_train(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two optimizer steps and one validation batch of the shipped real-data configs, as is."""
    monkeypatch.chdir(REPO)  # their data paths are relative to the repository root
    cli = train_main(
        [
            "fit",
            "--config",
            f"configs/mend/{name}.yaml",
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.callbacks",
            "[]",
        ]
    )
    assert cli.trainer.global_step == 2
    assert "val/edit_success" in cli.trainer.callback_metrics
