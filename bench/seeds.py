"""A recipe on three TinyFacts worlds: train and evaluate one config per world, print mean ± spread.

A recipe is judged on more than the world it was written on. For each world seed N this runs
the config with every ``tinyfacts`` model/world name replaced by ``tinyfacts-seedN`` (world *and*
model seeded with N; seed 0 is the default ``tinyfacts``), its own log folder and checkpoint
folder under ``runs/seeds/``, first ``train.py fit`` (for methods that learn something) and then
``evaluate.py`` on the best checkpoint, exactly as the README's commands do. It then prints each
world's figures and one table of mean, min and max per metric (×100), with the bars checked.

    python bench/seeds.py --config configs/mend/tinyfacts.yaml --fit
    python bench/seeds.py --config configs/lte/tinyfacts.yaml --fit \
        --eval-args --data.init_args.edits.init_args.n_test 200
    python bench/seeds.py --config configs/ft/tinyfacts.yaml          # nothing to train

Runs are independent processes (``--jobs`` at a time; every config fixes its own thread count,
so the figures do not depend on how many run side by side). A world whose results folder
already holds a ``summary.json`` is not run again unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
METRICS = ("reliability", "generalization", "portability", "locality",
           "reliability_em", "generalization_em", "fluency")


def world_name(seed: int) -> str:
    """The TinyFacts model name of world ``seed``."""
    return "tinyfacts" if seed == 0 else f"tinyfacts-seed{seed}"


def retarget(node: Any, name: str) -> Any:
    """Replace each ``tinyfacts``/``tinyfacts-llama``/``tinyfacts-4l`` config string (and its
    ``-cf`` twin) by world ``name``."""
    if isinstance(node, dict):
        return {k: retarget(v, name) for k, v in node.items()}
    if isinstance(node, list):
        return [retarget(v, name) for v in node]
    if node == "tinyfacts":
        return name
    if node in ("tinyfacts-llama", "tinyfacts-4l"):
        return name.replace("tinyfacts", node, 1)
    if isinstance(node, str) and node.endswith("-cf") and node[:-3] in ("tinyfacts",
                                                                         "tinyfacts-llama",
                                                                         "tinyfacts-4l"):
        return retarget(node[:-3], name) + "-cf"  # a second model of the world (SERAC)
    return node


def is_checkpoint(callback: dict[str, Any]) -> bool:
    """Whether a config's callback writes checkpoints (``ModelCheckpoint`` or a subclass of
    lit_edit's, e.g. ``lit_edit.callbacks.StepCheckpoint``)."""
    return callback.get("class_path", "").endswith(("ModelCheckpoint", "StepCheckpoint"))


def world_config(base: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    """The config of ``base`` on world ``seed``, logging and checkpointing into ``out``."""
    config = dict(base)
    name = world_name(seed)
    for section in ("model", "data"):
        config[section] = retarget(base[section], name)
    trainer = dict(base.get("trainer") or {})
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        trainer["logger"] = {**logger, "init_args": {**logger.get("init_args", {}),
                                                     "save_dir": str(out), "name": "logs"}}
    callbacks = []
    for cb in trainer.get("callbacks") or []:
        if is_checkpoint(cb):
            cb = {**cb, "init_args": {**cb.get("init_args", {}), "dirpath": str(out / "ckpt")}}
        callbacks.append(cb)
    if callbacks:
        trainer["callbacks"] = callbacks
    config["trainer"] = trainer
    return config


def checkpoint_of(config: dict[str, Any]) -> str:
    """The checkpoint ``fit`` keeps as best (the ModelCheckpoint's dirpath and filename)."""
    for cb in config["trainer"].get("callbacks") or []:
        if is_checkpoint(cb):
            args = cb["init_args"]
            return str(Path(args["dirpath"]) / f"{args.get('filename', 'best')}.ckpt")
    raise ValueError("the config has no ModelCheckpoint: nothing to evaluate after fit")


def run_world(args: argparse.Namespace, base: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train (optionally) and evaluate world ``seed``; return its ``summary.json``."""
    stem = Path(args.config).with_suffix("").as_posix().replace("configs/", "").replace("/", "-")
    out = REPO / "runs" / "seeds" / f"{stem}{args.tag}" / f"seed{seed}"
    results = out / "results"
    summary = results / "summary.json"
    if summary.is_file() and not args.force:
        return json.loads(summary.read_text())
    out.mkdir(parents=True, exist_ok=True)
    config = world_config(base, seed, out)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = open(out / "run.log", "w")
    extra = ["--config", str(path)]
    if args.fit:
        cmd = [sys.executable, "train.py", "fit", *extra, *args.fit_args]
        subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
        extra += ["--ckpt_path", checkpoint_of(config)]
    cmd = [sys.executable, "evaluate.py", *extra, "--evaluation.results_dir", str(results),
           *args.eval_args]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(summary.read_text())


def table(summaries: dict[int, dict[str, Any]], bars: dict[str, float]) -> str:
    """Markdown: one row per metric, one column per world, then mean, min–max and the bar."""
    seeds = sorted(summaries)
    head = "| metric | " + " | ".join(f"world {s}" for s in seeds) + " | mean | min–max | bar |"
    lines = [head, "|" + "---|" * (len(seeds) + 4)]
    for metric in METRICS:
        values = [summaries[s].get(metric) for s in seeds]
        if any(v is None for v in values):
            continue
        x = [100 * v for v in values]
        bar = bars.get(metric)
        verdict = "" if bar is None else (f"≥ {bar:g}: " + ("met" if min(x) >= bar else
                                          f"missed by {bar - min(x):.2f}"))
        lines.append(f"| {metric} | " + " | ".join(f"{v:.2f}" for v in x)
                     + f" | {sum(x) / len(x):.2f} | {min(x):.2f}–{max(x):.2f} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    """Run the worlds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a TinyFacts config")
    parser.add_argument("--fit", action="store_true", help="train.py fit before evaluating")
    parser.add_argument("--worlds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="worlds run side by side")
    parser.add_argument("--tag", default="", help="suffix of the runs/seeds/ folder")
    parser.add_argument("--force", action="store_true", help="re-run worlds already done")
    parser.add_argument("--bar", action="append", default=[], metavar="METRIC=VALUE",
                        help="a bar (x100) to check on every world, e.g. reliability=90")
    parser.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[],
                        help="extra arguments of train.py fit (last on the line)")
    parser.add_argument("--eval-args", nargs=argparse.REMAINDER, default=[],
                        help="extra arguments of evaluate.py (last on the line)")
    args = parser.parse_args()
    from lit_edit.environment import environment_line

    print(environment_line(), flush=True)
    base = yaml.safe_load((REPO / args.config).read_text())
    bars = {k: float(v) for k, v in (b.split("=", 1) for b in args.bar)}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {s: pool.submit(run_world, args, base, s) for s in args.worlds}
        summaries = {s: f.result() for s, f in futures.items()}
    print(f"{args.config} on worlds {args.worlds} ({summaries[args.worlds[0]]['n_records']} "
          "records each, x100):")
    print(table(summaries, bars))


if __name__ == "__main__":
    main()
