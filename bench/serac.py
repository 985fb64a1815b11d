"""SERAC training throughput at the peer's workload, and routing latency against memory size.

    python bench/serac.py --peer          # training steps/s = edits/s / 10 (needs the yardstick)
    python bench/serac.py --routing       # one query against 1k, 10k, 100k memory entries

The peer (PEER.md): all-MiniLM-L6-v2 bi-encoder (squared L2), a second yardstick-shaped GPT-2
as the counterfactual model, soft objective, 10 edits per training step, Adam lr 1e-5 stepped
every 10 training steps, max_length 32: 1.07 training steps/s = 10.7 edits/s. Here the same
workload runs under Lightning ``fit`` on the ZsRE training records (random weights: no figure
depends on what the models know), with sequences cut only at the model's 128 positions (lit_edit
never truncates an answer; the peer truncates every sequence at 32 tokens): more work per step.
Routing latency: the classifier embeds the query (cached embeddings are forgotten first) and
scans ``N`` float32 keys (random unit vectors inserted directly: embedding 100k texts is not
what is timed); the scan alone is timed again with the query's embedding cached.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Wall time of the training steps after the first ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        """Start the clock after the warm-up batches; count the timed batches."""
        if batch_idx == self.warmup:
            self.start = time.perf_counter()
        if self.start is not None:
            self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        """Stop the clock."""
        self.end = time.perf_counter()


def peer(args: argparse.Namespace) -> None:
    """Training steps/s (10 edits each) at the peer's settings, against its 1.07 steps/s."""
    sys.path.insert(0, str(REPO / "bench"))
    from yardstick import yardstick_dir, zsre_train_records

    from lit_edit.environment import environment_line
    from lit_edit.methods import SERACEditor

    records = zsre_train_records()
    print(environment_line())
    L.seed_everything(0, verbose=False)
    editor = SERACEditor(str(yardstick_dir(0)), counterfactual=str(yardstick_dir(1)),
                         classifier="all-MiniLM-L6-v2", objective=args.objective, lr=1e-5,
                         c_edit=0.1, c_loc=1.0,
                         # EasyEdit truncates every sequence at 32 tokens; lit_edit never
                         # truncates an answer (NQ locality answers take up to 71 tokens of
                         # the yardstick tokenizer), so sequences are cut from the left only
                         # at the model's 128 positions: more work per step than the peer's.
                         max_length=128)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=(args.warmup + args.steps) // 10 + 1,
        accumulate_grad_batches=10, gradient_clip_val=100.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
    )
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(records, batch_size=10, shuffle=True, generator=generator,
                        collate_fn=list)
    trainer.fit(editor, loader)
    assert timer.start is not None
    rate = (timer.steps - 1) / (timer.end - timer.start)
    print(f"SERAC training ({args.objective}, 10 edits per step, {args.threads} thread(s)): "
          f"{rate:.2f} training steps/s = {10 * rate:.1f} edits/s; the peer 10.7 edits/s: "
          f"{rate / 1.07:.2f}x (target >= 2x)")


def routing(args: argparse.Namespace) -> None:
    """Latency of routing one query against memories of growing size."""
    from lit_edit.methods import SERACEditor

    editor = SERACEditor().eval()
    dim = editor.classifier.embed(["x"]).shape[1]
    gen = torch.Generator().manual_seed(0)
    query = "Where was Ann born?"
    for n in args.sizes:
        editor.memory.clear()
        keys = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1)
        editor.memory.add(keys, [f"q{i}" for i in range(n)], [f"f{i}" for i in range(n)])
        times, scans = [], []
        for _ in range(args.repeats):
            editor.forget_embeddings()
            start = time.perf_counter()
            editor.route([query])
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            editor.route([query])  # the query's embedding is cached now: the scan alone
            scans.append(time.perf_counter() - start)
        print(f"routing one query, memory {n:>7,}: {1000 * min(times):.2f} ms with its "
              f"embedding, {1000 * min(scans):.2f} ms the scan alone (best of {args.repeats})")


def main() -> None:
    """Run the chosen benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", action="store_true", help="training at the peer's workload")
    parser.add_argument("--routing", action="store_true", help="routing latency")
    parser.add_argument("--objective", default="soft", choices=["soft", "supervised"])
    parser.add_argument("--steps", type=int, default=100, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed training steps first")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.peer or args.routing):
        parser.error("choose --peer and/or --routing")
    if args.routing:
        routing(args)
    if args.peer:
        peer(args)


if __name__ == "__main__":
    main()
