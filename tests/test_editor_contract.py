"""The editing contract, checked for every registered editor (``lit_edit.methods.__all__``).

Each editor is built from its TinyFacts config (``configs/<method>/tinyfacts.yaml``, found by the
editor's class path; every registered editor must have one) through the real CLI, then:
an edit changes only the state it declares (``edit_state_keys``) and its handle restores every
tensor bit-exactly; a checkpoint round trip into a fresh editor reproduces the same edit; an
editor that takes one edit at a time is refused by the batch protocol before any work.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml

import lit_edit.methods as methods
from lit_edit.cli import LitEditCLI
from lit_edit.editing import ParameterSnapshot
from lit_edit.editor import Editor, apply_edit
from lit_edit.methods.base import EditorModule
from lit_edit.protocols import BatchEdit
from lit_edit.world import load_world, resolve_tinyfacts

REPO = Path(__file__).resolve().parents[1]
#: per editor, overrides that keep the test small (no trained parts needed)
OVERRIDES = {
    "LTEEditor": ["--model.init_args.scope", "null", "--model.init_args.retriever", "hashing"],
    # the 2-block model (cached for every test) instead of tinyfacts-4l (an 8-minute build)
    "ROMEEditor": ["--model.init_args.backbone", "tinyfacts"],
    "MEMITEditor": ["--model.init_args.backbone", "tinyfacts", "--model.init_args.layers", "[0]",
                    "--model.init_args.steps", "5"],
    "AlphaEditEditor": ["--model.init_args.backbone", "tinyfacts", "--model.init_args.layers",
                        "[0]", "--model.init_args.steps", "5"],
    "ECEEditor": ["--model.init_args.backbone", "tinyfacts", "--model.init_args.layers", "[0]",
                  "--model.init_args.steps", "5"],
}


def registered() -> list[type[EditorModule]]:
    """Every editor class the CLI knows (imported in lit_edit/methods/__init__.py)."""
    out = []
    for name in methods.__all__:
        cls = getattr(methods, name)
        if inspect.isclass(cls) and issubclass(cls, EditorModule) and not inspect.isabstract(cls):
            out.append(cls)
    return out


def tinyfacts_config(cls: type) -> str:
    """The TinyFacts config whose model is ``cls``."""
    path = f"{cls.__module__}.{cls.__qualname__}"
    short = f"lit_edit.methods.{cls.__qualname__}"
    for config in sorted((REPO / "configs").glob("*/tinyfacts.yaml")):
        model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
        if model.get("class_path") in (path, short):
            return config.relative_to(REPO).as_posix()
    raise AssertionError(f"{path} has no configs/<method>/tinyfacts.yaml")


def build(cls: type) -> EditorModule:
    args = ["--config", tinyfacts_config(cls), "--trainer.logger", "false",
            *OVERRIDES.get(cls.__name__, [])]
    return LitEditCLI(args=args, run=False).model


@pytest.fixture(scope="module")
def records():
    return load_world(resolve_tinyfacts("tinyfacts")).edit_records(3, seed=5)


EDITORS = registered()


def test_every_editor_is_registered_with_a_config() -> None:
    assert {"FTEditor", "IKEEditor", "MENDEditor", "LTEEditor"} <= {c.__name__ for c in EDITORS}
    for cls in EDITORS:
        tinyfacts_config(cls)


@pytest.mark.parametrize("cls", EDITORS, ids=lambda c: c.__name__)
def test_edit_changes_only_declared_state_and_restores_bit_exactly(cls, records) -> None:
    editor = build(cls)
    assert isinstance(editor, Editor)
    before = ParameterSnapshot(editor)
    scores_before = editor.score_pairs([records[0].edit_pair])[0]
    with torch.inference_mode():  # as Lightning's test loop calls the protocols
        handle = apply_edit(editor, records[:1])
        changed = set(before.differences(editor))
        edited = editor.score_pairs([records[0].edit_pair])[0]
        handle.restore()
    declared = editor.edit_state_keys()
    assert changed <= declared, changed - declared
    if declared:  # an editor that declares state changes it (NoEdit declares none)
        assert changed, f"{cls.__name__}: an edit changed nothing in its state"
        assert not torch.equal(edited.logprobs, scores_before.logprobs)
    assert before.differences(editor) == []
    again = editor.score_pairs([records[0].edit_pair])[0]
    assert torch.equal(again.logprobs, scores_before.logprobs)


@pytest.mark.parametrize("cls", EDITORS, ids=lambda c: c.__name__)
def test_checkpoint_round_trip_reproduces_the_edit(cls, records) -> None:
    first = build(cls)
    checkpoint = {"state_dict": first.state_dict()}
    first.on_save_checkpoint(checkpoint)
    assert checkpoint["lit_edit_class"] == f"{cls.__module__}.{cls.__qualname__}"
    assert set(checkpoint["state_dict"]) == first.learned_state_keys()
    second = build(cls)
    second.on_load_checkpoint(checkpoint)
    second.load_state_dict(checkpoint["state_dict"])
    pair = records[1].edit_pair
    scores = []
    for editor in (first, second):
        with apply_edit(editor, records[1:2]):
            scores.append(editor.score_pairs([pair])[0])
    assert torch.equal(scores[0].logprobs, scores[1].logprobs)


@pytest.mark.parametrize("cls", EDITORS, ids=lambda c: c.__name__)
def test_batch_protocol_accepts_or_refuses_as_declared(cls, records) -> None:
    editor = build(cls)
    limit = editor.max_edits_per_call
    if limit is not None and limit < 2:
        with pytest.raises(ValueError, match="at most"):
            BatchEdit(batch_size=2).check(editor)
        with pytest.raises(ValueError, match="at most"):
            apply_edit(editor, records[:2])
        return
    BatchEdit(batch_size=2).check(editor)
    before = ParameterSnapshot(editor)
    with apply_edit(editor, records[:2]):
        assert bool(before.differences(editor)) == bool(editor.edit_state_keys())
    assert before.differences(editor) == []
