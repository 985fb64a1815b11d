"""A DDP ``fit`` of MEND on 2 CPU processes equals one process with the same global batch.

Two processes with 1 record each per step average their gradients; one process accumulating 2
batches of 1 record sums half of each. The data module deals the one-process order out to the
processes (:class:`~lit_edit.data.global_order.GlobalOrderSampler`; Lightning's own
distributed shuffle is another permutation), so the two runs see the same records in the same
steps and their final networks agree up to the float order of the gradient sums. The 2-process
run is a subprocess (Lightning's DDP re-launches the command, which cannot happen in pytest).

MEND's running normalisation of the gradient factors is compared on its own: under DDP every
rank folds in every rank's rows (so nothing is lost), but a step's two records are normalised
with statistics holding both, where one accumulating process normalises its first record before
it has seen the second: no single-process run equals it, so the fit comparison runs with
``norm: false`` and the statistics are tested against a hand merge.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader

from lit_edit.cli import train_main
from lit_edit.data.global_order import GlobalOrderSampler, one_process_order
from lit_edit.methods import MENDEditor
from lit_edit.nn.mend import RunningNorm

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mend" / "tinyfacts.yaml"
STEPS = 6

def test_the_processes_share_the_one_process_order_epoch_after_epoch() -> None:
    generator = torch.Generator().manual_seed(7)
    loader = DataLoader(list(range(11)), batch_size=1, shuffle=True, generator=generator,
                        collate_fn=lambda batch: batch[0])
    for epoch in range(3):
        single = list(loader)
        assert single == one_process_order(11, 7, epoch) and sorted(single) == list(range(11))
        shares = []
        for rank in (0, 1):
            sampler = GlobalOrderSampler(11, 7, num_replicas=2, rank=rank)
            sampler.set_epoch(epoch)
            shares.append(list(sampler))
        padded = single + single[:1]  # 12 = 2 x 6: the first position is repeated
        assert shares == [padded[0::2], padded[1::2]]


needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available (2-process CPU runs)",
)
ROWS = {0: 3, 1: 5}  # rows per rank: unequal on purpose


def _rows(rank: int) -> torch.Tensor:
    return torch.randn(ROWS[rank], 4, generator=torch.Generator().manual_seed(rank)) * (rank + 1)


def _norm_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    norm = RunningNorm(4)
    norm.update(_rows(rank))
    norm.update(_rows(rank)[:0])  # a rank without rows still takes part
    torch.save(dict(norm.state_dict()), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@needs_gloo
def test_running_norm_under_ddp_folds_every_ranks_rows_in_rank_order(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_norm_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    by_hand = RunningNorm(4)  # one process: rank 0's rows, then rank 1's
    by_hand.update(_rows(0))
    by_hand.update(_rows(1))
    every = torch.cat([_rows(0), _rows(1)])
    for rank in (0, 1):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert state["count"].item() == 8
        for key in ("mean", "m2"):
            assert torch.equal(state[key], by_hand.state_dict()[key]), (rank, key)
        torch.testing.assert_close(state["mean"], every.mean(0))
        torch.testing.assert_close(state["m2"], (every - every.mean(0)).square().sum(0))


def _args(out: Path) -> list[str]:
    callback = (
        '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
        f'{{"dirpath": "{out}", "filename": "final", "monitor": null, '
        f'"every_n_train_steps": {STEPS}, "enable_version_counter": false}}}}]'
    )
    return [
        "fit", "--config", str(CONFIG),
        "--trainer.max_steps", str(STEPS), "--trainer.logger", "false",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", callback,
        "--model.init_args.lr_schedule", "constant", "--model.init_args.norm", "false",
    ]


def _learned(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["global_step"] == STEPS
    return {k: v for k, v in state["state_dict"].items() if v.is_floating_point()}


@pytest.mark.slow
@needs_gloo
def test_ddp_fit_of_mend_equals_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    single = tmp_path / "single"
    train_main([*_args(single), "--trainer.accumulate_grad_batches", "2"])
    ddp = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    process = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *_args(ddp), "--trainer.devices", "2",
         "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:]
    one, two = _learned(single / "final.ckpt"), _learned(ddp / "final.ckpt")
    assert one.keys() == two.keys() and one
    initial = {k: v for k, v in _learned_initial().items() if k in one}
    moved = [k for k in one if not torch.equal(one[k], initial[k])]
    assert moved, "training changed nothing: the comparison would be empty"
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)


def _learned_initial() -> dict[str, torch.Tensor]:
    """The MEND network before training (same seed as both runs)."""
    seed_everything(0, verbose=False)
    init = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]
    editor = MENDEditor(**{**init, "lr_schedule": "constant", "norm": False})
    return {k: v for k, v in editor.state_dict().items() if v.is_floating_point()}
