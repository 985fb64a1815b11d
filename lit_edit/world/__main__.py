"""Command line: ``python -m lit_edit.world build|show``.

``build`` builds (or loads from the cache) a tiny model pretrained on a TinyFacts world and prints
its measured accuracies and its directory; ``show`` prints a world's size and sample records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from lit_edit.world.cache import (
    build_tiny_model,
    is_built,
    load_metrics,
    model_dir,
    named_configs,
)
from lit_edit.world.config import TinyLMConfig, WorldConfig
from lit_edit.world.generator import World


def _attribute_help(cls: type) -> dict[str, str]:
    """Field descriptions from the ``Attributes:`` section of a dataclass's docstring."""
    doc = (cls.__doc__ or "").split("Attributes:", 1)[-1]
    out: dict[str, str] = {}
    for match in re.finditer(r"^\s{8}(\w+): (.*?)(?=^\s{8}\w+: |\Z)", doc, re.M | re.S):
        out[match.group(1)] = " ".join(match.group(2).split())
    return out


def _add_fields(
    parser: argparse._ArgumentGroup,
    cls: type,
    skip: Sequence[str] = (),
    rename: dict[str, str] | None = None,
) -> None:
    """Add one ``--option`` per dataclass field (dest ``<Class>.<field>``), help from its docs."""
    helps = _attribute_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        if f.name == "intermediate_size":
            kind = int
        flag = (rename or {}).get(f.name, f.name).replace("_", "-")
        parser.add_argument(f"--{flag}", dest=f"{cls.__name__}.{f.name}", type=kind,
                            metavar=kind.__name__.upper(),
                            default=None, help=f"{helps.get(f.name, '')} (default: {f.default})")


def _pick(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """Build ``cls`` from the options given on the command line (others keep their defaults)."""
    given = {f.name: getattr(args, f"{cls.__name__}.{f.name}", None)
             for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in given.items() if v is not None}, **extra})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lit_edit.world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or load from the cache) a tiny TinyFacts model")
    build.add_argument("--name", default=None,
                       help="a model name as configs use it (tinyfacts, tinyfacts-seed1, "
                            "tinyfacts-llama-seed2, ...) instead of the settings below")
    build.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2",
                       help="model architecture (default: gpt2)")
    build.add_argument("--cache-dir", default=None,
                       help="cache directory (default: $LIT_EDIT_CACHE or ~/.cache/lit_edit)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--progress-bar", action="store_true", help="show the progress bar")
    _add_fields(build.add_argument_group("world"), WorldConfig)
    _add_fields(build.add_argument_group("model and training"), TinyLMConfig, skip=("arch",),
                rename={"seed": "train_seed"})
    show = sub.add_parser("show", help="print a world's size and sample edit records")
    show.add_argument("--records", type=int, default=1, help="edit records to print")
    _add_fields(show.add_argument_group("world"), WorldConfig)
    return parser


def _print_metrics(metrics: dict[str, Any]) -> None:
    print(f"pretraining: {metrics['train_seconds']:.1f} s ({metrics['num_threads']} threads, "
          f"{metrics['train_cpu_seconds']:.0f} s CPU), {metrics['n_parameters']:,} parameters, "
          f"{metrics['n_facts']:,} facts, {metrics['n_sequences']:,} sequences")
    print("teacher-forced token accuracy (pairs):")
    for name, value in metrics["accuracy"].items():
        print(f"  {name:<20} {value:6.3f}  ({metrics['n_pairs'][name]})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (see ``python -m lit_edit.world --help``)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        world_config = _pick(WorldConfig, args)
        if args.command == "show":
            world = World.generate(world_config)
            print(world)
            print(f"{len(world.two_hop)} two-hop facts, "
                  f"{len(world.pretraining_pairs())} pretraining sequences")
            for record in world.edit_records(args.records):
                print(json.dumps(record.to_dict(), indent=2))
            return 0
        model_config = _pick(TinyLMConfig, args, arch=args.arch)
        if args.name is not None:
            given = sorted(k.split(".", 1)[1] for k, v in vars(args).items()
                           if "." in k and v is not None)
            if given or args.arch != "gpt2":
                raise ValueError(f"--name {args.name} fixes every setting; drop "
                                 + ", ".join(f"--{k.replace('_', '-')}" for k in given or
                                             ["arch"]))
            world_config, model_config = named_configs(args.name)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    cached = is_built(model_dir(world_config, model_config, args.cache_dir)) and not args.force
    path = build_tiny_model(world_config, model_config, cache_dir=args.cache_dir,
                            force=args.force, progress_bar=args.progress_bar)
    how = "loaded from the cache" if cached else "built"
    print(f"{how} in {time.perf_counter() - start:.1f} s")
    _print_metrics(load_metrics(path))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
