"""Locate-then-edit costs on tinyfacts-4l and at GPT-2 XL width, side by side in one run.

1. Seconds per edit (edit + restore, the single-edit protocol's way) of ROME, MEMIT and
   AlphaEdit at the settings of ``configs/<method>/tinyfacts.yaml``, and seconds per batch of
   ``--batch`` facts for MEMIT and AlphaEdit (ECE too when ``lit_edit.methods.ece`` imports;
   otherwise a note). ``C`` is built (or read from the cache) by a warm-up edit, timed apart.
2. ``compute_values`` batched (one Adam loop over a ``[F, d]`` δ) against ``F`` separate calls
   on the same facts, at the MEMIT config's value site and settings.
3. The second moment ``C`` of block 0's ``c_proj`` inputs against the token count (the world's
   pretraining text, repeated as needed).
4. GPT-2-XL width on random fp32 weights (``n_embd`` 1600, ``n_inner`` 6400, 2 blocks, the
   TinyFacts tokenizer's 2048-token vocabulary, so the 50257-token LM head is *not* in the
   figure): ROME's rank-one solve, MEMIT's and AlphaEdit's ``[6400, 6400]`` solves for
   ``--xl-keys`` keys, and the value optimisation at block 0's ``c_proj`` per Adam step.
   AlphaEdit's one-off eigendecomposition of ``C`` only with ``--xl-eigh``.

    python bench/locate.py [--threads 1] [--edits 4] [--batch 20]
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def config_args(method: str) -> dict:
    """``model.init_args`` of ``configs/<method>/tinyfacts.yaml``."""
    path = REPO / "configs" / method / "tinyfacts.yaml"
    return dict(yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["init_args"])


def timed(fn) -> tuple[float, object]:
    """``(seconds, result)`` of ``fn()``."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def edit_seconds(editor, records) -> float:
    """Seconds of ``apply_edit(editor, records)`` + restore."""
    from lit_edit.editor import apply_edit

    seconds, handle = timed(lambda: apply_edit(editor, records))
    handle.restore()
    return seconds


def bench_editors(args, records) -> None:
    """Part 1: seconds per edit and per batch."""
    from lit_edit.methods import AlphaEditEditor, MEMITEditor, ROMEEditor

    editors = [("ROME", "rome", ROMEEditor), ("MEMIT", "memit", MEMITEditor),
               ("AlphaEdit", "alphaedit", AlphaEditEditor)]
    try:
        ece = importlib.import_module("lit_edit.methods.ece")
        cls = next(v for k, v in vars(ece).items() if k.endswith("Editor") and k != "EditorModule"
                   and getattr(v, "__module__", "") == ece.__name__)
        if (REPO / "configs" / "ece" / "tinyfacts.yaml").exists():
            editors.append(("ECE", "ece", cls))
        else:
            print("ECE: lit_edit.methods.ece imports but configs/ece/tinyfacts.yaml is missing; "
                  "skipped")
    except (ImportError, StopIteration):
        print("ECE: lit_edit.methods.ece is not importable on this branch; skipped")
    print(f"1. seconds per edit ({args.edits} single edits, then one batch of {args.batch}):")
    for name, method, cls in editors:
        settings = config_args(method)
        editor = cls(**settings)
        warm = edit_seconds(editor, records[:1])  # builds C (or reads the cache)
        single = [edit_seconds(editor, [r]) for r in records[1:1 + args.edits]]
        line = (f"  {name:9s} layers {settings.get('layers', settings.get('layer'))}: first edit "
                f"(loads or builds C) {warm:.2f} s; single edit {sum(single) / len(single):.2f} s")
        limit = getattr(editor, "max_edits_per_call", None)
        if limit is None or limit >= args.batch:
            batch = edit_seconds(editor, records[1:1 + args.batch])
            line += (f"; batch of {args.batch}: {batch:.2f} s ({batch / args.batch:.3f} s per "
                     f"edit, {sum(single) / len(single) * args.batch / batch:.1f}x the single "
                     "edits' rate)")
        else:
            line += f"; batches: n/a (takes {limit} edit per call)"
        print(line)
        del editor


def bench_values(args, records) -> None:
    """Part 2: batched compute_values against one call per fact."""
    from lit_edit.backbone import Backbone
    from lit_edit.nn.fact_tokens import requests_of
    from lit_edit.nn.locate import compute_values
    from lit_edit.nn.memit_solve import last_block

    settings = config_args("memit")
    backbone = Backbone.of(settings["backbone"])
    model, tokenizer = backbone.load_model(), backbone.load_tokenizer()
    module = last_block(model, settings["layers"])
    requests = requests_of(records[: args.facts])
    kwargs = {k: settings[k] for k in ("steps", "lr", "weight_decay", "clamp_norm_factor",
                                       "kl_factor")}
    batched, result = timed(lambda: compute_values(model, tokenizer, module, requests, ["{}"],
                                                   **kwargs))
    separate, parts = timed(lambda: [compute_values(model, tokenizer, module, [r], ["{}"],
                                                    **kwargs) for r in requests])
    gap = max(float((result.delta[i] - p.delta[0]).abs().max()) for i, p in enumerate(parts))
    print(f"2. compute_values, {len(requests)} facts at block {settings['layers'][-1]}'s output "
          f"(up to {kwargs['steps']} steps): one batched call {batched:.2f} s, {len(requests)} "
          f"separate calls {separate:.2f} s: {separate / batched:.1f}x faster batched "
          f"(max |δ difference| {gap:.1e})")
    return model, tokenizer


def bench_moments(args, model, tokenizer) -> None:
    """Part 3: second-moment build time against the token count."""
    from lit_edit.nn.layer_stats import input_second_moment
    from lit_edit.world import load_world, resolve_tinyfacts

    texts = load_world(resolve_tinyfacts("tinyfacts-4l")).pretraining_texts()
    budget = max(args.moment_tokens)
    corpus = list(texts)
    while sum(len(t) for t in corpus) < 6 * budget:  # > budget tokens (BPE: < 6 chars a token)
        corpus += texts
    parts = []
    for n in args.moment_tokens:
        seconds, (_, count) = timed(lambda n=n: input_second_moment(
            model, tokenizer, "transformer.h.0.mlp.c_proj", corpus, max_tokens=n))
        parts.append(f"{count // 1000}k tokens {seconds:.2f} s ({1e6 * seconds / count:.1f} µs "
                     "per token)")
    print("3. C of block 0's c_proj inputs (512 x 512): " + "; ".join(parts))


def bench_xl(args, tokenizer) -> None:
    """Part 4: the solves and the value optimisation at GPT-2 XL width."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lit_edit.nn.fact_tokens import FactRequest
    from lit_edit.nn.locate import compute_values, rank_one_update
    from lit_edit.nn.memit_solve import alphaedit_update, memit_update, nullspace_projector

    d, d_k = 1600, 6400
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=d, n_inner=d_k, n_layer=2, n_head=25,
                        n_positions=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    build, model = timed(lambda: GPT2LMHeadModel(config).eval())
    for p in model.parameters():
        p.requires_grad_(False)
    low = torch.randn(d_k, 64, dtype=torch.float64)
    moment = torch.diag(torch.rand(d_k, dtype=torch.float64) + 0.5) + low @ low.T / 64
    keys, residual = torch.randn(args.xl_keys, d_k), torch.randn(args.xl_keys, d)
    rome, _ = timed(lambda: rank_one_update(keys[0], residual[0], moment))
    lu, factor = timed(lambda: torch.linalg.lu_factor(moment))  # ROME: once per layer
    rome_lu, _ = timed(lambda: rank_one_update(keys[0], residual[0], moment, factor=factor))
    memit, _ = timed(lambda: memit_update(residual, keys, moment, 1.5e4))
    alpha, _ = timed(lambda: alphaedit_update(residual, keys, torch.eye(d_k,
                                                                        dtype=torch.float64), 10.0))
    line = (f"4. GPT-2 XL width (d 1600, d_k 6400; random fp32 weights, 2 blocks built in "
            f"{build:.1f} s): ROME solve {rome:.2f} s (with C factorised once per layer, "
            f"{lu:.2f} s: {rome_lu:.3f} s per edit); MEMIT solve for {args.xl_keys} keys "
            f"{memit:.2f} s; AlphaEdit solve {alpha:.2f} s")
    if args.xl_eigh:
        eigh, _ = timed(lambda: nullspace_projector(moment, 1e-2, "energy"))
        line += f"; AlphaEdit projector (eigh, once per layer) {eigh:.1f} s"
    print(line)
    words = "Ana Lo was born in the city of Paris and works for Acme".split()
    templates = ["{}"] + [" ".join(words[: 3 + i % 8]) + ". {}"
                          for i in range(args.xl_templates - 1)]
    request = FactRequest("Ana Lo was born in", "Ana Lo", "Rome")
    steps = args.xl_steps
    seconds, _ = timed(lambda: compute_values(
        model, tokenizer, model.transformer.h[0].mlp.c_proj, [request], templates, steps=steps,
        stop_below=-1.0))
    print(f"   value optimisation at block 0's c_proj, 1 fact x {len(templates)} templates: "
          f"{seconds:.2f} s for {steps} Adam steps ({seconds / steps:.3f} s per step)")


def main() -> None:
    """Time and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on the shared 2-core machine, 2 threads made a "
                        "tiny forward pass 30x slower)")
    parser.add_argument("--edits", type=int, default=4, help="single edits timed per editor")
    parser.add_argument("--batch", type=int, default=20, help="facts in the timed batch")
    parser.add_argument("--facts", type=int, default=20, help="facts of the compute_values run")
    parser.add_argument("--moment-tokens", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--xl-keys", type=int, default=100)
    parser.add_argument("--xl-templates", type=int, default=11)
    parser.add_argument("--xl-steps", type=int, default=5)
    parser.add_argument("--xl-eigh", action="store_true", help="also time the 6400 x 6400 eigh")
    parser.add_argument("--skip", nargs="*", default=[], choices=["editors", "values",
                                                                  "moments", "xl"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lit_edit.environment import environment_line
    from lit_edit.world import load_world, resolve_tinyfacts

    print(environment_line())
    start = time.perf_counter()
    records = load_world(resolve_tinyfacts("tinyfacts-4l")).edit_records(
        max(args.batch, args.edits, args.facts) + 1, seed=0)
    if "editors" not in args.skip:
        bench_editors(args, records)
    model = tokenizer = None
    if "values" not in args.skip:
        model, tokenizer = bench_values(args, records)
    if model is None:
        from lit_edit.backbone import Backbone

        backbone = Backbone.of("tinyfacts-4l")
        model, tokenizer = backbone.load_model(), backbone.load_tokenizer()
    if "moments" not in args.skip:
        bench_moments(args, model, tokenizer)
    if "xl" not in args.skip:
        bench_xl(args, tokenizer)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
