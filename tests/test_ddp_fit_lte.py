"""A DDP ``fit`` of LTE on 2 CPU processes equals one process with the same global batch.

LTE's length-bucketed loader deals whole one-process batches to the ranks
(:class:`~lit_edit.sampling.BucketBatches`, :class:`~lit_edit.sampling.BucketShareSampler`):
step ``k`` of 2 processes with batch 1 trains on the batches ``2k, 2k + 1`` one process
accumulates. Kept cheap for CI: ``configs/lte/tinyfacts.yaml`` with a conversations file of a
few short pairs instead of the built alignment data (no encoder, no replay, no scope head), a
short ``max_length``, batch 1, 3 steps, no validation. The 2-process run is a subprocess
(Lightning's DDP re-launches the command, which cannot happen in pytest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lit_edit.cli import train_main
from lit_edit.methods import LTEEditor

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "lte" / "tinyfacts.yaml"
STEPS = 3
PAIRS = [  # different lengths: the bucket order is not the file order
    ("Where is Paris?", "France"),
    ("Who wrote Hamlet, the play?", "Shakespeare"),
    ("What is two plus two?", "four"),
    ("Capital of Japan?", "Tokyo"),
    ("What colour is the clear sky at noon?", "blue"),
    ("Largest planet?", "Jupiter"),
]

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available (2-process CPU runs)",
)


def _conversations(path: Path) -> Path:
    rows = [
        {"id": str(i), "conversations": [{"from": "human", "value": q},
                                         {"from": "gpt", "value": a}]}
        for i, (q, a) in enumerate(PAIRS)
    ]
    path.write_text(json.dumps(rows))
    return path


def _args(out: Path, conversations: Path) -> list[str]:
    callback = (
        '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
        f'{{"dirpath": "{out}", "filename": "final", "monitor": null, '
        f'"every_n_train_steps": {STEPS}, "enable_version_counter": false}}}}]'
    )
    return [
        "fit", "--config", str(CONFIG),
        "--trainer.max_steps", str(STEPS), "--trainer.max_epochs", "-1",
        "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", callback,
        "--model.init_args.scope", "null", "--model.init_args.context_length", "null",
        "--model.init_args.max_length", "24", "--model.init_args.warmup_ratio", "0",
        "--model.init_args.retriever", "hashing",
        "--data.init_args.edits", "null", "--data.init_args.train_edits", "[]",
        "--data.init_args.train_conversations", str(conversations),
        "--data.init_args.replay", "null", "--data.init_args.unedited_answers", "dataset",
        "--data.init_args.encoder", "hashing", "--data.init_args.batch_size", "1",
    ]


def _trained(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["global_step"] == STEPS
    tensors = state["state_dict"].items()
    return {k: v for k, v in tensors if isinstance(v, torch.Tensor) and v.is_floating_point()}


@pytest.mark.slow
@needs_gloo
def test_ddp_fit_of_lte_equals_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    conversations = _conversations(tmp_path / "pairs.json")
    single = tmp_path / "single"
    train_main([*_args(single, conversations), "--trainer.accumulate_grad_batches", "2"])
    ddp = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    process = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *_args(ddp, conversations),
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stdout[-3000:]
    one, two = _trained(single / "final.ckpt"), _trained(ddp / "final.ckpt")
    assert one.keys() == two.keys() and one
    before = LTEEditor(backbone="tinyfacts", retriever="hashing").state_dict()
    moved = [k for k in one if not torch.equal(one[k], before[k])]
    assert len(moved) > len(one) // 2, "training changed little: the comparison would be weak"
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
