"""Peak memory of long sequential runs: RSS after T = 100 and T = 1000 sequential edits.

Each measurement is one ``evaluate.py`` run in a fresh process (the README's command, with the
method's TinyFacts config): ``n_test = T`` records edited one after another in one group of T
(``SequentialEdit(group_size=T, evaluate="after_group")``), scored after the last edit, then
rolled back. The figure is the process's peak resident set size (``ru_maxrss`` of that child,
read with ``os.wait4``). The growth between the two runs, divided by 900, is the cost of one
more kept edit: the edit itself (an FT/MEND weight change costs nothing more; an LTE/SERAC
memory entry a few KB) plus the per-record evaluation state (records, scores, results rows),
which the ``noedit`` reference row measures alone.

MEND and LTE need a checkpoint (``train.py fit``); without one (``--mend-ckpt``/``--lte-ckpt``)
they run untrained (``--allow_untrained true``): the same tensors and the same work per edit,
only the edits are worse; untrained LTE runs without its scope head (``scope: null``: an
untrained head refuses to route), i.e. top-1 retrieval only. The output says which rows are
untrained. SERAC uses
``--serac-ckpt`` (by default the seed-0 checkpoint under ``runs/seeds/``, if present).

    python bench/memory.py                                  # every method, T = 100 and 1000
    python bench/memory.py --methods ft noedit --edits 100 1000
    python bench/memory.py --repo /tmp/main-checkout        # the same runs on another checkout
    python bench/memory.py --edits-only                     # the edits alone, nothing scored

``--edits-only`` runs the protocol in-process on TinyFacts ``edit_records`` with a measurer that
scores nothing: the peak RSS growth between the first and the last edit is what the edits keep
(handles, copies, memories, caches), without the evaluation's per-record state.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MethodRun:
    """How ``evaluate.py`` runs one method for this benchmark.

    Attributes:
        name: Row label.
        configs: Config files, relative to the repository.
        n_test_key: The dotted key of the number of test records.
        extra: Further command-line arguments.
    """

    name: str
    configs: tuple[str, ...]
    n_test_key: str = "data.init_args.n_test"
    extra: tuple[str, ...] = ()


def method_runs() -> dict[str, MethodRun]:
    """The methods measured, by name (TinyFacts configs; fluency off: it does not edit)."""
    return {
        "noedit": MethodRun("noedit", ("configs/noedit/tinyfacts.yaml",)),
        "ft": MethodRun("ft", ("configs/ft/tinyfacts.yaml",)),
        "mend": MethodRun("mend", ("configs/mend/tinyfacts.yaml",),
                          extra=("--data.init_args.eval_batch_size", "50")),
        "lte": MethodRun("lte", ("configs/lte/tinyfacts.yaml",),
                         n_test_key="data.init_args.edits.init_args.n_test"),
        "serac": MethodRun("serac", ("configs/serac/tinyfacts.yaml",
                                     "configs/serac/tinyfacts_t1000.yaml")),
        "wise": MethodRun("wise", ("configs/wise/tinyfacts.yaml",
                                   "configs/wise/tinyfacts_t1000.yaml")),
    }


def sequential_overlay(folder: Path, t: int) -> Path:
    """A config overlay: one sequential group of ``t`` edits, scored after the last one."""
    path = folder / "sequential.yaml"
    path.write_text(
        "evaluation:\n"
        "  protocol:\n"
        "    class_path: lit_edit.protocols.SequentialEdit\n"
        "    init_args:\n"
        f"      group_size: {t}\n"
        "      evaluate: after_group\n"
        "  fluency: false\n",
        encoding="utf-8",
    )
    return path


def command(repo: Path, run: MethodRun, t: int, folder: Path, ckpt: str | None) -> list[str]:
    """The ``evaluate.py`` command line of one measurement."""
    cmd = [sys.executable, str(repo / "evaluate.py")]
    for config in run.configs:
        cmd += ["--config", str(repo / config)]
    cmd += ["--config", str(sequential_overlay(folder, t)), f"--{run.n_test_key}", str(t),
            "--evaluation.results_dir", str(folder / "results"), "--trainer.logger", "false",
            *run.extra]
    if ckpt:
        cmd += ["--ckpt_path", ckpt]
    elif run.name in ("mend", "lte"):
        cmd += ["--allow_untrained", "true"]
    return cmd + model_args(run, ckpt)  # an untrained LTE scope head refuses to route


def peak_rss_mb(cmd: list[str], repo: Path, cwd: Path, log: Path) -> tuple[float, float, int]:
    """Run ``cmd`` in a fresh process; its peak RSS (MB), wall time (s) and exit status."""
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, time.perf_counter() - start, proc.returncode  # KB on Linux


def checkpoints(args: argparse.Namespace, repo: Path) -> dict[str, str | None]:
    """The checkpoint of each method (``None``: none, untrained where the method learns)."""
    serac = args.serac_ckpt
    if serac is None:
        default = Path("/work/main/runs/seeds/serac-tinyfacts/seed0/ckpt/best.ckpt")
        local = repo / "runs/seeds/serac-tinyfacts/seed0/ckpt/best.ckpt"
        serac = next((str(p) for p in (local, default) if p.exists()), None)
    return {"mend": args.mend_ckpt, "lte": args.lte_ckpt, "serac": serac}


def model_args(run: MethodRun, ckpt: str | None) -> list[str]:
    """Model overrides of an untrained run (LTE without its scope head)."""
    return ["--model.init_args.scope", "null"] if run.name == "lte" and not ckpt else []


def edits_only_child(repo: Path, run: MethodRun, t: int, ckpt: str | None) -> None:
    """In this process: build the editor, apply ``t`` sequential edits, print RSS figures.

    The protocol runs with a measurer that scores nothing and reads the process's peak RSS at
    its two calls (before the first edit, after the last), so the difference is what the
    edits alone keep; then the RSS after the rollback. Records: TinyFacts ``edit_records``.
    """
    import json
    import resource

    import torch

    from lit_edit.cli import LitEditCLI
    from lit_edit.protocols import SequentialEdit
    from lit_edit.world import load_world, resolve_tinyfacts

    torch.set_num_threads(1)
    args = [a for c in run.configs for a in ("--config", str(repo / c))]
    args += ["--trainer.logger", "false", *model_args(run, ckpt)]
    editor = LitEditCLI(args=args, run=False).model
    if ckpt:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        editor.on_load_checkpoint(checkpoint)
        editor.load_state_dict(checkpoint["state_dict"])
    records = load_world(resolve_tinyfacts("tinyfacts")).edit_records(t, seed=0)
    peaks: list[float] = []

    class Probe:
        """Reads the peak RSS instead of scoring."""

        def measure(self, editor: object, records: list, parallel: bool = False) -> list:
            """Record the peak RSS so far (MB)."""
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            return [None] * len(records)

        def values(self, pre: object, post: object, is_pre: bool = False) -> dict:
            """No values."""
            return {}

    with torch.inference_mode():
        SequentialEdit(t, "after_group").run(editor, records, Probe(), group=0)
    print(json.dumps({"before": peaks[0], "after": peaks[1]}))


def edits_only(repo: Path, run: MethodRun, t: int, ckpt: str | None) -> tuple[float, float]:
    """Peak RSS (MB) before the first and after the last of ``t`` edits, in a fresh process."""
    import json

    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, "--repo", str(repo), "--child", run.name, str(t),
           ckpt or ""]
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{run.name} T={t} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        return float("nan"), float("nan")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return figures["before"], figures["after"]


def label(name: str, ckpt: str | None) -> str:
    """Whether the row's editor is trained."""
    if name in ("noedit", "ft", "wise"):  # nothing to train
        return "n/a"
    if ckpt:
        return "trained"
    return "UNTRAINED, no scope head" if name == "lte" else "UNTRAINED"


def cli_table(args: argparse.Namespace, repo: Path, ckpts: dict[str, str | None]) -> None:
    """Peak RSS of whole ``evaluate.py`` runs (edits and scoring), one row per method."""
    runs = method_runs()
    t1, t2 = args.edits
    print(f"| method | checkpoint | T={t1} | T={t2} | MB per extra edit | time T={t2} (s) |")
    print("|---|---|---|---|---|---|")
    for name in args.methods:
        run = runs[name]
        ckpt = ckpts.get(name)
        figures = []
        for t in (t1, t2):
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=f"mem-{name}-{t}-", dir=args.keep))
            cmd = command(repo, run, t, folder, ckpt)
            rss, seconds, code = peak_rss_mb(cmd, repo, folder, folder / "log.txt")
            if code != 0:
                tail = (folder / "log.txt").read_text(encoding="utf-8")[-3000:]
                print(f"{name} T={t} failed ({code}):\n{tail}", file=sys.stderr)
            if args.keep is None:
                shutil.rmtree(folder, ignore_errors=True)
            figures.append((rss, seconds, code))
        (r1, _, c1), (r2, s2, c2) = figures
        per_edit = (r2 - r1) / (t2 - t1)
        mark = "" if c1 == c2 == 0 else " (FAILED)"
        print(f"| {name}{mark} | {label(name, ckpt)} | {r1:.0f} | {r2:.0f} | {per_edit:.3f} "
              f"| {s2:.0f} |", flush=True)


def edits_table(args: argparse.Namespace, repo: Path, ckpts: dict[str, str | None]) -> None:
    """Peak RSS growth of the edits alone (no scoring), one row per method."""
    runs = method_runs()
    t1, t2 = args.edits
    print(f"| method | checkpoint | + during {t1} edits | + during {t2} edits "
          "| MB per extra edit |")
    print("|---|---|---|---|---|")
    for name in args.methods:
        ckpt = ckpts.get(name)
        grown = []
        for t in (t1, t2):
            before, after = edits_only(repo, runs[name], t, ckpt)
            grown.append(after - before)
        per_edit = (grown[1] - grown[0]) / (t2 - t1)
        print(f"| {name} | {label(name, ckpt)} | {grown[0]:.1f} | {grown[1]:.1f} "
              f"| {per_edit:.3f} |", flush=True)


def main() -> None:
    """Measure and print one table row per method."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["noedit", "ft", "mend", "lte", "serac"])
    parser.add_argument("--edits", nargs=2, type=int, default=[100, 1000], metavar=("T1", "T2"))
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="checkout whose evaluate.py, configs and lit_edit are run")
    parser.add_argument("--mend-ckpt", default=None)
    parser.add_argument("--lte-ckpt", default=None)
    parser.add_argument("--serac-ckpt", default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep logs in this folder")
    parser.add_argument("--edits-only", action="store_true",
                        help="measure the edits alone (the protocol in-process, no scoring)")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    repo = args.repo.resolve()
    if args.child:
        name, t, ckpt = args.child
        edits_only_child(repo, method_runs()[name], int(t), ckpt or None)
        return
    ckpts = checkpoints(args, repo)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    if args.edits_only:
        print(f"repo {repo} @ {commit}; peak RSS growth (MB) during one sequential group of T "
              "edits, nothing scored (in-process protocol, fresh process per figure)")
        edits_table(args, repo, ckpts)
    else:
        print(f"repo {repo} @ {commit}; peak RSS (MB) of evaluate.py, one sequential group of T")
        cli_table(args, repo, ckpts)


if __name__ == "__main__":
    main()
