"""Every YAML under configs/ parses and instantiates through the real CLI.

Each config's header starts with the command it is for (``# python train.py fit --config ...``
or ``# python evaluate.py --config ...``); the test runs exactly those ``--config`` files through
``LitEditCLI`` (``run=False``: editor, data and trainer are built, nothing runs), with tiny
overrides where a config names a model that needs a hub or a GPU.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from lit_edit.cli import LitEditCLI

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))


def header_command(path: str) -> list[str]:
    """The first ``python train.py|evaluate.py`` command of a config's header, as arguments."""
    lines = []
    for line in (REPO / path).read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if lines or re.match(r"python (train|evaluate)\.py\b", text):
            lines.append(text.rstrip("\\").strip())
            if not line.rstrip().endswith("\\"):
                break
    assert lines, f"{path}: the header does not start with its command"
    return shlex.split(" ".join(lines))


def config_files(args: list[str]) -> list[str]:
    """The ``--config`` files of a command."""
    return [args[i + 1] for i, a in enumerate(args) if a == "--config"]


def test_every_config_names_itself_in_its_command() -> None:
    for path in CONFIGS:
        assert path in config_files(header_command(path)), path


@pytest.mark.parametrize("path", CONFIGS)
def test_config_instantiates(path: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(REPO)
    command = header_command(path)
    files = config_files(command)
    text = "".join((REPO / f).read_text() for f in files)
    if "../shared/data" in text and not (REPO / "../shared/data").is_dir():
        pytest.skip("the config reads ../shared/data, absent here")
    args = [a for f in files for a in ("--config", f)]
    # tiny stand-ins for what needs a hub or a GPU
    if re.search(r"backbone:\s*\n?\s*(name:\s*)?(gpt2-xl|meta-llama|Qwen)", text):
        args += ["--model.init_args.backbone", "tinyfacts"]
        model_args = {}
        for f in files:  # the blocks of a real-size model do not exist in the 2-block stand-in
            model_args.update(((yaml.safe_load((REPO / f).read_text()) or {}).get("model") or {})
                              .get("init_args") or {})
        if "layer" in model_args:
            args += ["--model.init_args.layer", "-1"]
        if "layers" in model_args:
            args += ["--model.init_args.layers", "[0, 1]"]
        if "inner_params" in text:
            args += ["--model.init_args.inner_params", "null"]
        if "counterfactual:" in text:  # SERAC's hub-sized parts
            args += ["--model.init_args.counterfactual", "tinyfacts-cf",
                     "--model.init_args.classifier", "all-MiniLM-L6-v2"]
    if "tinyfacts-4l" in text:  # the 2-block model every test has, not an 8-minute build
        args += ["--model.init_args.backbone", "tinyfacts", "--data.init_args.world", "tinyfacts"]
    if "accelerator: gpu" in text:
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1",
                 "--trainer.strategy", "auto", "--trainer.precision", "32"]
    args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    cli = LitEditCLI(args=args, run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


def test_every_command_runs_with_a_fixed_thread_count() -> None:
    """The thread count changes floating-point results: each config's command fixes it."""
    import yaml

    for path in CONFIGS:
        threads = None
        for config in config_files(header_command(path)):
            threads = (yaml.safe_load((REPO / config).read_text()) or {}).get("threads", threads)
        assert isinstance(threads, int) and threads >= 1, f"{path}: threads={threads!r}"
