"""Building tiny TinyFacts models once and caching them on disk, keyed by their settings."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lit_edit.random_state import preserved_random_state
from lit_edit.world.config import TinyLMConfig, WorldConfig, settings_hash
from lit_edit.world.generator import World

log = logging.getLogger(__name__)

#: Bump when the world generator, tokenizer or training recipe changes what a build produces.
#: 2: the training thread count is a fixed setting and part of the key (was picked from the load).
FORMAT_VERSION = 2
#: Libraries whose version can change what a build produces (recorded in ``metrics.json``).
_LIBRARIES = ("torch", "transformers", "tokenizers", "lightning", "numpy")


def library_versions() -> dict[str, str]:
    """The installed versions of the libraries that can change what a build produces."""
    from lit_edit.environment import library_versions as versions

    return versions(_LIBRARIES)
#: Model seed offset of a ``-cf`` name: another model of the same world (same tokenizer), e.g.
#: SERAC's counterfactual model.
CF_SEED_OFFSET = 1000
_DONE = "metrics.json"  # written last: a directory holding it is a finished build


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding built models.

    Args:
        cache_dir: Explicit directory; default ``$LIT_EDIT_CACHE``, else ``~/.cache/lit_edit``.

    Returns:
        ``<cache dir>/tinyfacts``.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("LIT_EDIT_CACHE") or Path.home() / ".cache" / "lit_edit"
    return Path(cache_dir).expanduser() / "tinyfacts"


def model_key(world_config: WorldConfig, model_config: TinyLMConfig) -> str:
    """The cache key of a build: a hash of the world, model and training settings and the format.

    Every setting is in the key, ``num_threads`` included (it changes the trained weights). The
    library versions are not (a cache would be rebuilt at every upgrade); they are recorded in
    the build's ``metrics.json`` and a mismatch is reported when the build is used
    (:func:`check_versions`).
    """
    return settings_hash({"format": FORMAT_VERSION}, world_config.to_dict(),
                         model_config.to_dict())


class TinyFactsVersionWarning(UserWarning):
    """A cached TinyFacts build was made with other library versions than the installed ones."""


def check_versions(path: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """Compare the library versions a build was made with against the installed ones.

    A difference is reported with a :class:`TinyFactsVersionWarning` (shown once per process
    by Python's default warning filter): the build is still used, but a fresh build with the
    installed versions may differ, and so may every figure measured on it.

    Args:
        path: A finished build's directory.

    Returns:
        ``{library: (built with, installed)}`` for each library that differs.
    """
    recorded = load_metrics(path).get("versions", {})
    current = library_versions()
    differ = {k: (recorded.get(k, "unrecorded"), v) for k, v in current.items()
              if recorded.get(k, "unrecorded") != v}
    if differ:
        listed = ", ".join(f"{k} {a} (installed {b})" for k, (a, b) in sorted(differ.items()))
        warnings.warn(
            f"the TinyFacts build {path} was made with {listed}; a build with the installed "
            "versions may have other weights and give other figures (rebuild with "
            "`python -m lit_edit.world build --force`)",
            TinyFactsVersionWarning,
            stacklevel=2,
        )
    return differ


def model_dir(
    world_config: WorldConfig,
    model_config: TinyLMConfig,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The directory a build with these settings lives in (whether built or not)."""
    key = model_key(world_config, model_config)
    return cache_root(cache_dir) / f"tinyfacts-{model_config.arch}-{key}"


def is_built(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a finished build."""
    return (Path(path) / _DONE).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent builders of the same model build it once."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_into(
    out: Path, world_config: WorldConfig, model_config: TinyLMConfig, progress_bar: bool
) -> dict[str, Any]:
    """Generate the world, train tokenizer and model, measure and save everything into ``out``."""
    from lit_edit.world.evaluate import evaluate_world
    from lit_edit.world.pretrain import cpu_threads, pretrain_model
    from lit_edit.world.tokenizer import train_tokenizer

    world = World.generate(world_config)
    pairs = world.pretraining_pairs()
    texts = [f"{p.prompt} {p.answer}" for p in pairs]
    log.info("TinyFacts world: %d facts, %d two-hop facts, %d pretraining sequences",
             len(world.facts), len(world.two_hop), len(pairs))
    tokenizer = train_tokenizer(texts, model_config.vocab_size)
    start, cpu_start = time.perf_counter(), time.process_time()
    model = pretrain_model(model_config, tokenizer, pairs, progress_bar=progress_bar)
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - cpu_start
    log.info("pretraining took %.1f s; measuring accuracies", train_seconds)
    start = time.perf_counter()
    with cpu_threads(model_config.num_threads):
        accuracies = evaluate_world(model, tokenizer, world)
    metrics = {
        "accuracy": {k: v for k, v in accuracies.items() if not k.endswith("_n")},
        "n_pairs": {k[:-2]: int(v) for k, v in accuracies.items() if k.endswith("_n")},
        "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2),
        "eval_seconds": round(time.perf_counter() - start, 2),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "n_sequences": len(pairs),
        "n_facts": len(world.facts),
        "key": model_key(world_config, model_config),
        "format_version": FORMAT_VERSION,
        "versions": library_versions(),
        "num_threads": model_config.num_threads,
    }
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    world.save(out / "world.json")
    (out / "tinylm.json").write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")
    (out / _DONE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def build_tiny_model(
    world_config: WorldConfig | None = None,
    model_config: TinyLMConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress_bar: bool = False,
) -> Path:
    """Return the directory of a tiny model pretrained on a TinyFacts world, building it if needed.

    The directory holds the model and tokenizer (``save_pretrained``), ``world.json`` (see
    :func:`load_world`), ``tinylm.json`` (the :class:`TinyLMConfig`) and ``metrics.json`` (the
    measured accuracies, see :func:`lit_edit.world.evaluate.evaluate_world`). A build goes into a
    temporary directory renamed into place when complete, under a file lock, so concurrent
    callers build once and never see a partial directory.

    Args:
        world_config: The world (default :class:`WorldConfig`).
        model_config: The model and its training (default :class:`TinyLMConfig`).
        cache_dir: Cache directory (see :func:`cache_root`).
        force: Rebuild even if a finished build exists (it is replaced atomically).
        progress_bar: Show Lightning's progress bar while pretraining.

    Returns:
        The model directory.
    """
    world_config = world_config or WorldConfig()
    model_config = model_config or TinyLMConfig()
    final = model_dir(world_config, model_config, cache_dir)
    if is_built(final) and not force:
        log.debug("TinyFacts model found in cache: %s", final)
        check_versions(final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f"{final.name}.lock"):
        if is_built(final) and not force:  # another process built it while we waited
            check_versions(final)
            return final
        for stale in final.parent.glob(f".{final.name}.*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        log.info("building TinyFacts %s model into %s (once; later runs load it)",
                 model_config.arch, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            with preserved_random_state():  # a cold cache must not change the caller's run
                metrics = _build_into(tmp, world_config, model_config, progress_bar)
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
                final.rename(old / "model")
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    acc = metrics["accuracy"]
    log.info("built %s in %.0f s: accuracy %.3f on pretrained phrasings, %.3f on held-out ones",
             final.name, metrics["train_seconds"], acc["train_templates"],
             acc["held_out_templates"])
    return final


def resolve_tinyfacts(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Map a TinyFacts model name to its cached directory, building it on first use.

    Args:
        name: ``"tinyfacts"`` (default world, tiny GPT-2), ``"tinyfacts-llama"`` (default world,
            tiny LLaMA), ``"tinyfacts-4l"`` (default world, 4-block tiny GPT-2),
            ``"tinyfacts-wide"`` (default world, tiny GPT-2 with a 2048-wide MLP), or any of
            them with ``-seed<N>`` appended (``"tinyfacts-seed1"``): another world and another
            model, :class:`WorldConfig` and :class:`TinyLMConfig` both seeded with ``N``
            (``-seed0`` is the default); ``-cf`` appended (``"tinyfacts-cf"``,
            ``"tinyfacts-seed1-cf"``) gives a second model of the same world and tokenizer, its
            model seed ``N + 1000`` (SERAC's counterfactual model).
        cache_dir: Cache directory (see :func:`cache_root`).

    Returns:
        The model directory (loadable with ``AutoModelForCausalLM.from_pretrained``).

    Raises:
        ValueError: on another name.
    """
    world_config, model_config = named_configs(name)
    return build_tiny_model(world_config, model_config, cache_dir=cache_dir)


def named_configs(name: str) -> tuple[WorldConfig, TinyLMConfig]:
    """The world and model settings a TinyFacts model name stands for.

    See :func:`resolve_tinyfacts` for the names.

    Raises:
        ValueError: on a name that is not ``tinyfacts[-llama|-4l|-wide][-seed<N>][-cf]``.
    """
    match = re.fullmatch(r"(tinyfacts(?:-llama|-4l|-wide)?)(?:-seed(\d+))?(-cf)?", name)
    configs = default_model_configs()
    if match is None or match.group(1) not in configs:
        raise ValueError(
            f"unknown TinyFacts model {name!r}; known: {sorted(configs)}, each optionally with "
            "-seed<N> for another world and model (e.g. 'tinyfacts-seed1') and -cf for a second "
            "model of the same world (e.g. 'tinyfacts-seed1-cf')"
        )
    seed = int(match.group(2) or 0)
    model_seed = seed + CF_SEED_OFFSET if match.group(3) else seed
    model_config = dataclasses.replace(configs[match.group(1)], seed=model_seed)
    return WorldConfig(seed=seed), model_config


def default_model_configs() -> dict[str, TinyLMConfig]:
    """The named default models: ``tinyfacts``, ``-llama``, ``-4l`` and ``-wide``.

    ``tinyfacts-4l`` is the GPT-2 with 4 blocks instead of 2, for locate-then-edit methods: an
    edit written into an early block's MLP needs later blocks to carry it to the answer
    (LOCATE_THEN_EDIT.md §9.1). ``tinyfacts-wide`` is the GPT-2 with a 4x wider MLP (2048
    instead of 512): a value matrix of 2048 x 128 for side-memory editors (WISE), whose
    sequential edits overwrite each other in the default 512 x 128 one.
    """
    return {"tinyfacts": TinyLMConfig(arch="gpt2"), "tinyfacts-llama": TinyLMConfig(arch="llama"),
            "tinyfacts-4l": TinyLMConfig(arch="gpt2", n_layer=4),
            "tinyfacts-wide": TinyLMConfig(arch="gpt2", intermediate_size=2048)}


def load_world(model_dir: str | os.PathLike) -> World:
    """Regenerate the world a TinyFacts model was pretrained on (from its ``world.json``).

    Raises:
        FileNotFoundError: if the directory has no ``world.json`` (not a TinyFacts model).
        ValueError: if the generator changed since the model was built.
    """
    path = Path(model_dir) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a TinyFacts model directory (no world.json)")
    return World.load(path)


def load_metrics(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read the accuracies and build statistics saved with a TinyFacts model."""
    return json.loads((Path(model_dir) / _DONE).read_text())
