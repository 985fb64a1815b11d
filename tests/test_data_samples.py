"""Sample raw records and the shared-data location, for the ``test_data_*`` test files.

This module holds no tests; it is imported by the other ``test_data_*`` files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

DATA = Path(
    os.environ.get(
        "LIT_EDIT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)
"""The shared data folder: ``../shared/data`` beside the repository, or ``$LIT_EDIT_SHARED_DATA``
(a git worktree sits elsewhere)."""
needs_data = pytest.mark.skipif(
    not DATA.is_dir(),
    reason=f"the shared data folder {DATA} is absent (it sits beside the repository, not in it)",
)


# --- synthetic raw records, one per format (used by several tests) ---------------------------


def zsre_raw(**over: Any) -> dict[str, Any]:
    raw = {
        "subject": "Paris",
        "src": "Which country is Paris in?",
        "pred": "France",
        "rephrase": "Paris is a city of which country?",
        "alt": "Italy",
        "answers": ["France"],
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare",
        "cond": "France >> Italy || Which country is Paris in?",
    }
    raw.update(over)
    return raw


def counterfact_raw(**over: Any) -> dict[str, Any]:
    raw = {
        "case_id": 7,
        "prompt": "The mother tongue of Ann is",
        "target_new": "English",
        "subject": "Ann",
        "ground_truth": "French",
        "rephrase_prompt": "Ann speaks",
        "locality_prompt": "Bob is a native speaker of",
        "locality_ground_truth": "French",
    }
    raw.update(over)
    return raw


def rome_raw(**over: Any) -> dict[str, Any]:
    raw = {
        "case_id": 3,
        "pararel_idx": 9,
        "requested_rewrite": {
            "prompt": "{} originates from",
            "relation_id": "P495",
            "target_new": {"str": "Japan", "id": "Q17"},
            "target_true": {"str": "France", "id": "Q142"},
            "subject": "Camembert",
        },
        "paraphrase_prompts": ["Camembert comes from", "The origin of Camembert is"],
        "neighborhood_prompts": ["Brie originates from", "Roquefort originates from"],
        "attribute_prompts": ["Sushi originates from"],
        "generation_prompts": ["Camembert is a cheese that"],
    }
    raw.update(over)
    return raw


def knowedit_raw(**over: Any) -> dict[str, Any]:
    raw = {
        "subject": "Ann",
        "prompt": "Ann works for",
        "target_new": "Acme",
        "ground_truth": [["Globex", "Globex Corp"], ["Initech"]],
        "rephrase_prompt": "The employer of Ann is",
        "portability": {
            "Reasoning": [{"prompt": "The CEO of Ann's employer is", "ground_truth": "Wile"}],
            "Subject_Aliasing": [{"prompt": "Annie works for", "ground_truth": [["Acme", "ACME"]]}],
        },
        "locality": {
            "Relation_Specificity": [{"prompt": "Ann was born in", "ground_truth": ["Oslo"]}]
        },
    }
    raw.update(over)
    return raw


def wise_raw(**over: Any) -> dict[str, Any]:
    raw = {
        "prompt": "This is a Wikipedia passage about ann lee. Ann Lee was a painter.",
        "target_new": "She lived in Oslo.",
        "subject": "ann lee",
        "locality_prompt": "The weather today is",
        "locality_ground_truth": "sunny and warm",
    }
    raw.update(over)
    return raw


def conversation_raw(**over: Any) -> dict[str, Any]:
    raw = {
        "id": "identity_0_zsre",
        "conversations": [
            {"from": "human", "value": "What is the capital of France?"},
            {"from": "gpt", "value": "Paris"},
        ],
    }
    raw.update(over)
    return raw


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def ft_config(tmp_path: Path, data: Path) -> Path:
    """An FT evaluation config of the edit file `data`, results under `tmp_path`."""
    import yaml

    config = {
        "trainer": {"logger": False, "enable_progress_bar": False},
        "model": {"class_path": "lit_edit.methods.FTEditor"},
        "data": {
            "class_path": "lit_edit.data.EditDataModule",
            "init_args": {"test_path": str(data)},
        },
        "evaluation": {"results_dir": str(tmp_path / "results")},
    }
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
