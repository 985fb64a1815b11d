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
        if run.name == "lte":  # an untrained scope head refuses to route: retrieval only
            cmd += ["--model.init_args.scope", "null"]
    return cmd


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
    args = parser.parse_args()
    repo = args.repo.resolve()
    runs = method_runs()
    ckpts = checkpoints(args, repo)
    t1, t2 = args.edits
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"repo {repo} @ {commit}; peak RSS (MB) of evaluate.py, one sequential group of T")
    print(f"| method | checkpoint | T={t1} | T={t2} | MB per extra edit | time T={t2} (s) |")
    print("|---|---|---|---|---|---|")
    for name in args.methods:
        run = runs[name]
        ckpt = ckpts.get(name)
        trained = "n/a" if name in ("noedit", "ft") else (ckpt and "trained") or (
            "UNTRAINED, no scope head" if name == "lte" else "UNTRAINED")
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
        print(f"| {name}{mark} | {trained} | {r1:.0f} | {r2:.0f} | {per_edit:.3f} | {s2:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
