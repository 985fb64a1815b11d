"""MEND on the tiny model: training steps/s, edit latency, and the Lightning loop's overhead.

Builds the editor and the data of a MEND config (default: the TinyFacts quick-start config),
then, in one run:

* trains with ``lightning.Trainer.fit`` (no logger, checkpointing or progress bar; accumulation
  and clipping as configured) and with a bare PyTorch loop doing the same step on the same
  batches (tokenize, ``meta_step``, backward, finite check, clip, Adam step), alternately
  ``--rounds`` times from the same initial state, and reports the best time of each;
* times ``edit`` (one gradient + one editor pass, in place) followed by ``restore``, the way the
  single-edit protocol calls them under ``torch.inference_mode``.

    python bench/mend.py [--config configs/mend/tinyfacts.yaml] [--steps 300] [--edits 200]
    python bench/mend.py --peer [--threads 2]   # the peer's settings on the yardstick shape

``--peer`` trains MEND the way PEER.md timed EasyEdit (13.4 training steps/s, one edit record
and one locality record per training step, the optimizer stepping every 10; edits in 40 ms):
the yardstick-shaped GPT-2 (``bench/yardstick.py``), inner matrices ``h.{2,3}.mlp.{c_fc,c_proj}``,
rank 256, one hidden layer, shared, norm, Adam lr 1e-4 / lr_lr 1e-4, clip 100, c_edit 0.1,
c_loc 1.0, the edit loss on the edit prompt (EasyEdit), max length 64 (the peer truncates at
40; lit_edit never truncates answers), on the 998 valid
records of ZsRE train-1k; it prints training steps/s and ms per edit beside the peer's figures.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

from lit_edit.methods import MENDEditor

REPO = Path(__file__).resolve().parents[1]


def instantiate(spec: dict[str, Any], **override: Any) -> Any:
    """Build ``class_path(**init_args)`` from a config section."""
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{**spec.get("init_args", {}), **override})


class StepTimer(L.Callback):
    """Wall time of the optimizer steps after the first ``warmup`` (excludes fit's setup)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        """Start the clock at the first step after the warm-up."""
        if self.start is None and trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        """Stop the clock."""
        self.end = time.perf_counter()


def loader(records: list, seed: int) -> DataLoader:
    """Seeded shuffled loader of one record per batch (MEND's training batches)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(records, batch_size=1, shuffle=True, generator=generator, collate_fn=list)


def lightning_run(editor: MENDEditor, records: list, steps: int, warmup: int, accumulate: int,
                  clip: float | None) -> float:
    """Optimizer steps per second of ``MENDEditor`` under Lightning ``fit`` (after warm-up)."""
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(editor, loader(records, 0))
    assert timer.start is not None and timer.end is not None
    return timer.end - timer.start


def bare_run(editor: MENDEditor, records: list, steps: int, warmup: int, accumulate: int,
             clip: float | None) -> float:
    """The same optimisation in a plain loop (what ``fit`` does, minus Lightning)."""
    editor.train()
    configured = editor.configure_optimizers()  # runs after a Lightning run: max_steps is set
    scheduler = None
    if isinstance(configured, dict):  # {"optimizer": ..., "lr_scheduler": {"scheduler": ...}}
        optimizer = configured["optimizer"]
        scheduler = configured["lr_scheduler"]["scheduler"]
    else:
        optimizer = configured
    params = [p for g in optimizer.param_groups for p in g["params"]]
    done, micro, start = 0, 0, None
    while done < warmup + steps:
        for records_batch in loader(records, 0):
            if done == warmup and start is None:
                start = time.perf_counter()
            batch = editor.collate(records_batch)  # as on_before_batch_transfer in fit
            loss = editor.meta_step(batch)["loss"] / accumulate
            loss.backward()
            micro += 1
            if micro % accumulate:
                continue
            grads = [p.grad for p in params if p.grad is not None]
            if not torch.stack([g.isfinite().all() for g in grads]).all():
                for p in params:
                    p.grad = None
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad()
            if scheduler is not None:
                scheduler.step()
            done += 1
            if done >= warmup + steps:
                break
    assert start is not None
    return time.perf_counter() - start


def edit_latency(editor: MENDEditor, records: list) -> tuple[float, float]:
    """Mean milliseconds of ``edit`` and of ``restore``, called as the single-edit protocol does."""
    from lit_edit.editor import apply_edit

    editor.eval()
    t_edit = t_restore = 0.0
    with torch.inference_mode():
        for record in records[:5]:  # warm-up
            apply_edit(editor, [record]).restore()
        for record in records:
            t0 = time.perf_counter()
            handle = apply_edit(editor, [record])
            t1 = time.perf_counter()
            handle.restore()
            t_restore += time.perf_counter() - t1
            t_edit += t1 - t0
    return 1000 * t_edit / len(records), 1000 * t_restore / len(records)


def peer(args: argparse.Namespace) -> None:
    """MEND training steps/s and edit latency at the peer's settings, against its figures."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from yardstick import yardstick_dir, zsre_records, zsre_train_records

    from lit_edit.environment import environment_line

    records = zsre_train_records()
    print(environment_line())
    L.seed_everything(0, verbose=False)
    editor = MENDEditor(
        str(yardstick_dir()),
        inner_params=[
            f"transformer.h.{i}.mlp.{m}.weight" for i in (2, 3) for m in ("c_fc", "c_proj")
        ],
        rank=256, n_hidden=1, norm=True, shared=True, lr=1e-4, lr_lr=1e-4, c_edit=0.1,
        c_loc=1.0, edit_loss_on="inner", train_rephrases="first", train_locality="first",
        # EasyEdit truncates at 40 tokens; lit_edit never truncates an answer, so the few longer
        # NQ locality pairs get their full length here: more work per step than the peer's.
        max_length=64,
    )
    initial = {k: v.clone() for k, v in editor.state_dict().items()}
    accumulate, steps, warmup = 10, max(1, args.steps // 10), 2
    times = []
    for _ in range(args.rounds):
        editor.load_state_dict(initial)
        times.append(lightning_run(editor, records, steps, warmup, accumulate, 100.0))
    t = min(times)
    rate = steps * accumulate / t
    print(f"MEND training at the peer's settings ({len(records)} ZsRE records, accumulate "
          f"{accumulate}, {args.threads} thread(s), best of {args.rounds}): {rate:.1f} training "
          f"steps/s = edits/s; the peer 13.4: {rate / 13.4:.2f}x (target >= 1.5x)")
    ms_edit, _ = edit_latency(editor, zsre_records(args.edits))
    print(f"MEND edit at the peer's settings: {ms_edit:.2f} ms per edit; the peer 40 ms: "
          f"{40 / ms_edit:.1f}x")


def main() -> None:
    """Run the benchmark and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/mend/tinyfacts.yaml"))
    parser.add_argument("--steps", type=int, default=300, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=20, help="untimed optimizer steps first")
    parser.add_argument("--edits", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="alternate Lightning/bare runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peer", action="store_true", help="the peer's settings (PEER.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peer:
        peer(args)
        return

    config = yaml.safe_load(Path(args.config).read_text())
    trainer_cfg = config.get("trainer", {})
    accumulate = int(trainer_cfg.get("accumulate_grad_batches", 1))
    clip = trainer_cfg.get("gradient_clip_val")
    data = instantiate(config["data"])
    data.setup("fit")
    records = data.records["train"]
    print(f"config {args.config}: {len(records)} training records, accumulate {accumulate}, "
          f"clip {clip}, {args.threads} thread(s)")

    L.seed_everything(0, verbose=False)
    editor = instantiate(config["model"])
    initial = {k: v.clone() for k, v in editor.state_dict().items()}
    n_micro = args.steps * accumulate
    times: dict[str, list[float]] = {"lightning": [], "bare": []}
    for _ in range(args.rounds):
        for name, run in (("lightning", lightning_run), ("bare", bare_run)):
            editor.load_state_dict(initial)
            times[name].append(run(editor, records, args.steps, args.warmup, accumulate, clip))
    t_l, t_b = min(times["lightning"]), min(times["bare"])
    print(f"training, Lightning fit: {args.steps / t_l:.1f} optimizer steps/s "
          f"({n_micro / t_l:.1f} edits/s; best of {args.rounds}: {t_l:.2f} s)")
    print(f"training, bare loop:     {args.steps / t_b:.1f} optimizer steps/s "
          f"({n_micro / t_b:.1f} edits/s; best of {args.rounds}: {t_b:.2f} s)")
    print(f"Lightning overhead: {100 * (t_l / t_b - 1):+.1f}% (target <= 10%)")

    test = data.records.get("val") or records
    ms_edit, ms_restore = edit_latency(editor, (test * (1 + args.edits // len(test)))[: args.edits])
    print(f"edit latency: {ms_edit:.2f} ms per edit (+ {ms_restore:.3f} ms restore), "
          f"{args.edits} single edits")


if __name__ == "__main__":
    main()
