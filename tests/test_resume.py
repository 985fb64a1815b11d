"""Fault-tolerant training: ``kill -9`` during ``fit``, then ``--ckpt_path last``, ends bit-exactly
where an uninterrupted run ends; ``last.ckpt`` holds the final step."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from test_mend import WORDS, make_backbone
from torch.utils.data import DataLoader

from lit_edit.callbacks import RandomStateCheckpoint
from lit_edit.cli import train_main
from lit_edit.data.resumable import ResumableLoader
from lit_edit.sampling import LengthBucketSampler

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MAX_STEPS = 22  # 9 batches an epoch: the run crosses two epoch boundaries
EVERY = 4  # checkpoint interval; 22 is not a multiple of it
PAUSE_AT = 14  # the killed run is 2 steps past its last checkpoint (step 12), in epoch 2


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_backbone(tmp_path_factory.mktemp("resume") / "gpt2", "gpt2"))


@pytest.fixture(scope="module")
def zsre(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ZsRE-format file of 30 records (18 for training) about the tiny model's words."""
    names, cities = WORDS[:10], ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Baku"]
    rows = [
        {
            "subject": names[i % 10],
            "src": f"where was {names[i % 10]} born",
            "pred": cities[i % 6],
            "rephrase": f"{names[i % 10]} was born in the city of",
            "alt": cities[(i + 1 + i // 10) % 6],
            "answers": [cities[i % 6]],
            "loc": f"nq question: what language {names[(i + 3) % 10]} speaks",
            "loc_ans": ["French", "Latin", "Norse"][i % 3],
            "cond": "",
        }
        for i in range(30)
    ]
    path = tmp_path_factory.mktemp("resume_data") / "zsre.json"
    path.write_text(json.dumps(rows))
    return str(path)


def write_config(tmp: Path, backbone: str, data: str, *callbacks: dict[str, Any]) -> Path:
    """A MEND fit config: cosine schedule, batches of 2, a StepCheckpoint every EVERY steps."""
    config = {
        "seed_everything": 0,
        "threads": 1,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": MAX_STEPS,
            "val_check_interval": 5,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 2,
            "num_sanity_val_steps": 1,
            "gradient_clip_val": 100.0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "callbacks": [
                *callbacks,
                {
                    "class_path": "lit_edit.callbacks.StepCheckpoint",
                    "init_args": {
                        "dirpath": str(tmp / "checkpoints"),
                        "filename": "final",
                        "monitor": None,
                        "every_n_train_steps": EVERY,
                        "save_last": True,
                        "enable_version_counter": False,
                    },
                },
            ],
        },
        "model": {
            "class_path": "lit_edit.methods.MENDEditor",
            "init_args": {
                "backbone": backbone, "rank": 8, "lr": 1e-3, "lr_lr": 1e-2, "edit_lr": 1e-2,
                "lr_schedule": "cosine",
            },
        },
        "data": {
            "class_path": "lit_edit.data.EditDataModule",
            "init_args": {
                "path": data, "val_fraction": 0.2, "test_fraction": 0.2, "batch_size": 2,
                "shuffle_seed": 3,
            },
        },
    }
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "mend.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def seen_callback() -> dict[str, Any]:
    return {"class_path": "resume_helpers.SeenRecords"}


def assert_same_checkpoint(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Every tensor of the weights and of the optimizer state equal; same step and schedule."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"{len(differ)} of {len(a['state_dict'])} tensors differ: {differ[:5]}"
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert opt_a["state"].keys() == opt_b["state"].keys()
        for key, state in opt_a["state"].items():
            other = opt_b["state"][key]
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other[name]))
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["loops"]["fit_loop"]["epoch_progress"] == b["loops"]["fit_loop"]["epoch_progress"]


def start_killable_fit(config: Path, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before its pause:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run did not reach its pause in time")
        time.sleep(0.2)


def test_killed_fit_resumes_to_the_uninterrupted_checkpoint(
    backbone: str, zsre: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(TESTS))  # resume_helpers, as the child imports it
    whole = train_main(["fit", "--config", str(write_config(tmp_path / "whole", backbone, zsre,
                                                              seen_callback()))])
    assert whole.trainer.global_step == MAX_STEPS
    reference = torch.load(tmp_path / "whole/checkpoints/last.ckpt", weights_only=False)

    marker = tmp_path / "paused"
    pause = {"class_path": "resume_helpers.PauseAtStep",
             "init_args": {"step": PAUSE_AT, "marker": str(marker)}}
    killed_config = write_config(tmp_path / "killed", backbone, zsre, pause)
    child = start_killable_fit(killed_config, tmp_path)
    wait_for(marker, child)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    last = tmp_path / "killed/checkpoints/last.ckpt"
    interrupted = torch.load(last, weights_only=False)
    assert interrupted["global_step"] == 12  # the last checkpoint before the kill
    position = interrupted["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert position[0]["batches"] == 3  # 3 of the second epoch's 9 batches

    resumed_config = write_config(tmp_path / "killed", backbone, zsre, seen_callback())
    resumed = train_main(["fit", "--config", str(resumed_config), "--ckpt_path", "last"])
    assert resumed.trainer.global_step == MAX_STEPS
    assert_same_checkpoint(torch.load(last, weights_only=False), reference)
    final = torch.load(tmp_path / "killed/checkpoints/final.ckpt", weights_only=False)
    assert final["global_step"] == MAX_STEPS

    # the resumed run saw exactly the uninterrupted run's batches from step 12 on
    seen_whole = next(c for c in whole.trainer.callbacks if type(c).__name__ == "SeenRecords").seen
    seen_resumed = next(
        c for c in resumed.trainer.callbacks if type(c).__name__ == "SeenRecords"
    ).seen
    assert seen_resumed == seen_whole[12:]


def test_last_checkpoint_holds_the_final_step(backbone: str, zsre: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, backbone, zsre)
    train_main(["fit", "--config", str(config), "--trainer.max_steps", "7"])  # 7 % 4 != 0
    for name in ("last.ckpt", "final.ckpt"):
        saved = torch.load(tmp_path / "checkpoints" / name, weights_only=False)
        assert saved["global_step"] == 7, name


def test_a_plain_model_checkpoint_misses_the_final_steps(
    backbone: str, zsre: str, tmp_path: Path
) -> None:
    """What StepCheckpoint fixes: Lightning's own ModelCheckpoint leaves last.ckpt at step 4."""
    config = write_config(tmp_path, backbone, zsre)
    text = config.read_text().replace("lit_edit.callbacks.StepCheckpoint",
                                      "lightning.pytorch.callbacks.ModelCheckpoint")
    config.write_text(text)
    train_main(["fit", "--config", str(config), "--trainer.max_steps", "7"])
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 4


def test_loader_position_survives_a_new_loader() -> None:
    """A new loader given the saved state yields the rest of the epoch, then the next epochs,
    exactly as the first loader would have."""

    def loader() -> ResumableLoader:
        generator = torch.Generator()
        generator.manual_seed(5)
        return ResumableLoader(list(range(10)), batch_size=3, shuffle=True, generator=generator)

    first = loader()
    epochs = [[b.tolist() for b in first] for _ in range(3)]
    second = loader()
    it = iter(second)
    taken = [next(it).tolist(), next(it).tolist()]
    assert taken == epochs[0][:2]
    state = second.state_dict()
    assert state["batches"] == 2
    third = loader()
    third.load_state_dict(state)
    rest = [[b.tolist() for b in third] for _ in range(3)]
    assert rest[0] == epochs[0][2:]
    assert rest[1:] == epochs[1:]
    # a state saved at the end of an epoch starts the next one
    done = loader()
    list(done)
    fourth = loader()
    fourth.load_state_dict(done.state_dict())
    assert [b.tolist() for b in fourth] == epochs[1]


def test_loader_refuses_a_position_past_its_data() -> None:
    resumed = ResumableLoader(list(range(4)), batch_size=2)
    with pytest.raises(ValueError, match="lies past this run's 2 training batches"):
        resumed.load_state_dict({"generator": None, "batches": 5})
    with pytest.raises(ValueError, match="not a ResumableLoader state"):
        resumed.load_state_dict({"_iterator": 3})


def test_loader_order_is_the_plain_shuffled_loader_order() -> None:
    """Epoch after epoch, taken as Lightning takes a sized loader's batches (``len`` of them,
    never past the end), the order is that of a plain shuffled DataLoader with the same
    generator: published figures of earlier runs stay as they were."""

    def epochs(loader: DataLoader) -> list[list[list[int]]]:
        return [[b.tolist() for b in islice(iter(loader), len(loader))] for _ in range(4)]

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(11)

    data = list(range(13))
    plain = DataLoader(data, batch_size=4, shuffle=True, generator=generator())
    resumable = ResumableLoader(data, batch_size=4, shuffle=True, generator=generator())
    assert epochs(resumable) == epochs(plain)


def test_random_states_come_back_when_training_starts() -> None:
    callback = RandomStateCheckpoint()
    saved = callback.state_dict()
    drawn = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    resumed = RandomStateCheckpoint()
    resumed.load_state_dict(saved)
    assert random.random() != drawn[0]  # loading alone changes nothing ...
    resumed.on_train_start(None, None)  # type: ignore[arg-type]
    assert (random.random(), float(np.random.rand()), torch.rand(2).tolist()) == drawn


def test_length_bucketed_loader_resumes_in_a_later_epoch() -> None:
    """LTE's loader: the epoch's order comes from ``set_epoch`` (Lightning calls it before each
    epoch), the position in it from the loader's state."""
    lengths = [(7 * i) % 13 for i in range(40)]

    def loader() -> ResumableLoader:
        return ResumableLoader(list(range(40)), batch_sampler=LengthBucketSampler(lengths, 3, 1))

    whole = loader()
    epochs = []
    for epoch in range(3):
        whole.batch_sampler.set_epoch(epoch)
        epochs.append([b.tolist() for b in whole])
    assert epochs[1] != epochs[2]
    killed = loader()
    killed.batch_sampler.set_epoch(1)
    it = iter(killed)
    assert [next(it).tolist() for _ in range(5)] == epochs[1][:5]
    resumed = loader()
    resumed.load_state_dict(killed.state_dict())
    resumed.batch_sampler.set_epoch(1)  # the restored epoch, before the pass starts
    assert [b.tolist() for b in resumed] == epochs[1][5:]
    resumed.batch_sampler.set_epoch(2)
    assert [b.tolist() for b in resumed] == epochs[2]
