"""TinyFacts: the embedded synthetic world, its tokenizer, tiny pretrained models and their cache.

Quick use::

    from lit_edit.world import resolve_tinyfacts, load_world
    model_dir = resolve_tinyfacts("tinyfacts")      # builds once (about a minute), then cached
    world = load_world(model_dir)
    records = world.edit_records(100, seed=0)

Command line: ``python -m lit_edit.world build [--arch gpt2|llama] [--force] ...``.

Design choices (measured, see ``metrics.json`` of a build):

* Every relation has 6 templates (3 statements, 3 questions); 2 are held out per fact and are
  that fact's rephrase prompts. Each template is pretrained with 2/3 of the facts, so held-out
  phrasings are known paraphrases (a phrasing never seen at all scores only 20-30%).
* Two-hop phrasings are pretrained for every subject with 1 of 3 templates held out per two-hop
  fact (the portability prompt). A 2-layer model does not compose two hops it never saw, so
  composed questions are stored facts here, as they largely are in real LMs: after an edit the
  two-hop answer changes only if the editor propagates it.
* Each person has a one-word alias; "X is also known as Y" statements and each person's facts
  phrased with the alias (2 of the fact's pretrained templates) are pretrained, so the
  ``subject_aliasing`` portability prompts are phrasings the model knows.
* Pretraining is language modelling on whole-fact sequences (BOS, fact, EOS) with the answer
  tokens weighted 8x, which halves the epochs needed without giving up the LM loss on names.
"""

from typing import TYPE_CHECKING, Any

from lit_edit.world.cache import (
    FORMAT_VERSION,
    TinyFactsVersionWarning,
    build_tiny_model,
    cache_root,
    check_versions,
    default_model_configs,
    is_built,
    library_versions,
    load_metrics,
    load_world,
    model_dir,
    model_key,
    named_configs,
    resolve_tinyfacts,
)
from lit_edit.world.config import TinyLMConfig, WorldConfig
from lit_edit.world.edits import make_edit_record, make_edit_records
from lit_edit.world.generator import Fact, TwoHopFact, World
from lit_edit.world.templates import Composition, Relation, alias_templates, compositions, relations

if TYPE_CHECKING:
    from lit_edit.world.evaluate import evaluate_world, probe_sets, token_accuracies
    from lit_edit.world.pretrain import TinyLMModule, build_model, pretrain_model
    from lit_edit.world.tokenizer import train_tokenizer

# heavy modules (torch, lightning, transformers) load on first use, so that resolving a cached
# model is fast
_LAZY = {
    "evaluate_world": "evaluate",
    "probe_sets": "evaluate",
    "token_accuracies": "evaluate",
    "TinyLMModule": "pretrain",
    "build_model": "pretrain",
    "pretrain_model": "pretrain",
    "train_tokenizer": "tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"lit_edit.world.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lit_edit.world' has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "Composition",
    "Fact",
    "Relation",
    "TinyLMConfig",
    "TinyFactsVersionWarning",
    "TinyLMModule",
    "TwoHopFact",
    "World",
    "WorldConfig",
    "alias_templates",
    "build_model",
    "build_tiny_model",
    "cache_root",
    "check_versions",
    "compositions",
    "default_model_configs",
    "evaluate_world",
    "is_built",
    "library_versions",
    "load_metrics",
    "load_world",
    "make_edit_record",
    "make_edit_records",
    "model_dir",
    "model_key",
    "named_configs",
    "pretrain_model",
    "probe_sets",
    "relations",
    "resolve_tinyfacts",
    "token_accuracies",
    "train_tokenizer",
]
