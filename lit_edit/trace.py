"""Causal tracing from the command line: ``python -m lit_edit.trace``.

One prompt (``--prompt``, ``--subject``, optional ``--answer``) or ``--n`` records of a data
set (``--data``: a TinyFacts model name for its world's facts, or a records file read by
:func:`lit_edit.data.read_records`) is traced (:mod:`lit_edit.nn.causal_trace`) for each
``--kind``. Written to ``--out``: ``trace_<kind>.png`` (the heatmap: one prompt's layers ×
tokens, or the data set's average over ROME's six token groups), ``trace_<kind>.json`` (the
numbers) and ``trace.pt`` (the tensors). It prints, per kind, the layer with the largest
average indirect effect at the subject's last token ("pick this layer").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lit_edit.trace",
        description="Causal tracing (ROME): restore clean hidden states into a run with a "
        "noised subject and record the answer's probability per layer x token.")
    parser.add_argument("--model", default="tinyfacts-4l",
                        help="TinyFacts name, local directory or hub name (default: tinyfacts-4l, "
                        "the backbone of configs/rome/tinyfacts.yaml)")
    parser.add_argument("--prompt", help="a prompt containing --subject")
    parser.add_argument("--subject", help="the subject whose token embeddings are noised")
    parser.add_argument("--answer", help="the answer traced (default: the greedy next token)")
    parser.add_argument("--data", help="a TinyFacts model name (its world's facts) or a records "
                        "file (.json/.jsonl: ZsRE, CounterFact, ...)")
    parser.add_argument("--n", type=int, default=50, help="records of --data (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the TinyFacts records")
    parser.add_argument("--all-records", action="store_true",
                        help="also average records whose greedy answer is not the true one "
                        "(default: only the facts the model knows, as in ROME)")
    parser.add_argument("--kind", action="append", choices=["block", "mlp", "attn"],
                        help="sites to restore, repeatable (default: block, mlp and attn)")
    parser.add_argument("--window", type=int, default=None,
                        help="layers restored together (default 1 for block, 10 for mlp/attn)")
    parser.add_argument("--noise-factor", type=float, default=3.0,
                        help="noise std as a multiple of the embeddings' std (default 3)")
    parser.add_argument("--samples", type=int, default=10, help="noise draws (default 10)")
    parser.add_argument("--noise-seed", type=int, default=1, help="seed of the noise")
    parser.add_argument("--batch-size", type=int, default=512, help="rows per forward pass")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default="runs/trace", help="output folder")
    return parser


def _records(data: str, n: int, seed: int) -> list[tuple[str, str, str]]:
    """``(prompt, subject, answer)`` of the first ``n`` records of ``data``."""
    if data.startswith("tinyfacts"):
        from lit_edit.world import load_world, resolve_tinyfacts

        records = load_world(resolve_tinyfacts(data)).edit_records(n, seed=seed)
    else:
        from lit_edit.data import read_records

        records = list(read_records(data).records)[:n]
    out = []
    for i, r in enumerate(records):
        if not r.subject or r.subject not in r.prompt:
            raise ValueError(f"record {i} of {data}: subject {r.subject!r} is not in its prompt")
        if not r.ground_truth:
            raise ValueError(f"record {i} of {data}: no ground_truth to trace")
        out.append((r.prompt, r.subject, r.ground_truth[0]))
    return out


def plot_heatmap(
    values: torch.Tensor, columns: Sequence[str], title: str, path: Path, label: str
) -> None:
    """Write a layers × columns heatmap PNG (layers on the y axis, 0 at the top).

    Args:
        values: ``[L, C]`` numbers.
        columns: ``C`` column labels (tokens or token groups).
        title: The figure title.
        path: The PNG file.
        label: The colour bar's label.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(6.0, 1.0 + 0.6 * values.shape[1])
    fig, ax = plt.subplots(figsize=(width, 2.5 + 0.45 * values.shape[0]))
    image = ax.imshow(values.numpy(), cmap="Purples", aspect="auto")
    ax.set_xticks(range(len(columns)), [c.strip() or repr(c) for c in columns], rotation=60,
                  ha="right", fontsize=8)
    ax.set_yticks(range(values.shape[0]))
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Trace the prompt or the records and write the PNGs, JSON and ``trace.pt`` to ``args.out``.

    Args:
        args: The parsed command line (:func:`main`).

    Returns:
        The summary written to ``summary.json``: per kind, the window, the mean ``p_clean`` and
        ``p_corrupted``, the mean indirect effect per layer at the subject's last token and
        the layer where it is largest (``pick_layer``).

    Raises:
        ValueError: on a subject not in its prompt, a record without answer, or data of which
            the model knows no fact.
    """
    from lit_edit.backbone import Backbone
    from lit_edit.nn.causal_trace import (
        category_effects,
        category_names,
        embedding_std,
        encode_prompt,
        trace_prompt,
    )

    backbone = Backbone.of(args.model)
    model, tokenizer = backbone.load_model(), backbone.load_tokenizer()
    if args.data:
        facts = _records(args.data, args.n, args.seed)
    else:
        facts = [(args.prompt, args.subject, args.answer)]
    prompts = [encode_prompt(tokenizer, p, s, a, model) for p, s, a in facts]
    if args.data and not args.all_records:  # ROME averages the facts the model knows
        with torch.no_grad():
            greedy = [int(model(input_ids=p.input_ids[None]).logits[0, -1].argmax())
                      for p in prompts]
        prompts = [p for p, g in zip(prompts, greedy, strict=True) if g == p.answer_id]
        if not prompts:
            raise ValueError(f"the model knows none of the {len(facts)} records (--all-records "
                             "traces them anyway)")
    std = embedding_std(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"model": args.model, "records": len(prompts),
                               "of": len(facts), "embedding_std": std, "kinds": {}}
    tensors: dict[str, torch.Tensor] = {}
    for kind in args.kind or ["block", "mlp", "attn"]:
        results = [trace_prompt(model, p, kind, args.window, args.noise_factor, args.samples,
                                args.noise_seed, args.batch_size, std) for p in prompts]
        last = torch.stack([r.indirect_effect[:, r.prompt.subject[1] - 1] for r in results])
        mean_last = last.mean(0)  # [L]
        info: dict[str, Any] = {
            "window": results[0].window,
            "p_clean": sum(r.p_clean for r in results) / len(results),
            "p_corrupted": sum(r.p_corrupted for r in results) / len(results),
            "subject_last_effect": mean_last.tolist(),
            "pick_layer": int(mean_last.argmax()),
        }
        if len(results) == 1:
            r = results[0]
            s0, s1 = r.prompt.subject
            values = r.p_restored
            columns = [t + "*" if s0 <= i < s1 else t for i, t in enumerate(r.prompt.tokens)]
            info["trace"] = r.to_dict()
            tensors[f"{kind}/p_restored"] = r.p_restored
        else:
            values = torch.stack([category_effects(r) for r in results]).nanmean(0)  # [L, 6]
            columns = list(category_names())
            info["category_effect"] = values.tolist()
            info["records"] = [r.to_dict() for r in results]
            values = values + info["p_corrupted"]
            tensors[f"{kind}/category_effect"] = values - info["p_corrupted"]
        tensors[f"{kind}/subject_last_effect"] = last
        what = {"block": "hidden state", "mlp": "MLP output", "attn": "attention output"}[kind]
        title = (f"restoring the {what} (window {info['window']}), {args.model}, "
                 f"{len(results)} record(s)\np_clean {info['p_clean']:.3f}, "
                 f"p_corrupted {info['p_corrupted']:.3f}")
        plot_heatmap(values, columns, title, out / f"trace_{kind}.png", "p(answer)")
        (out / f"trace_{kind}.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        summary["kinds"][kind] = {k: v for k, v in info.items() if k not in ("records", "trace")}
    torch.save(tensors, out / "trace.pt")
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (see ``python -m lit_edit.trace --help``).

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a usage or input error (printed as one ``error:`` line).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if bool(args.data) == bool(args.prompt):
        print("error: give either --prompt and --subject, or --data", file=sys.stderr)
        return 2
    if args.prompt and not args.subject:
        print("error: --prompt needs --subject", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        summary = run(args)
    except (ValueError, OSError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"traced {summary['records']} of {summary['of']} record(s) of {args.model} in "
          f"{time.perf_counter() - start:.1f} s; written to {args.out}")
    for kind, info in summary["kinds"].items():
        effects = " ".join(f"{e:+.3f}" for e in info["subject_last_effect"])
        print(f"{kind:5s} window {info['window']:2d}: p_clean {info['p_clean']:.3f} "
              f"p_corrupted {info['p_corrupted']:.3f}; indirect effect at the subject's last "
              f"token per layer: {effects}; pick this layer: {info['pick_layer']}")
        n_layers = len(info["subject_last_effect"])
        if kind != "block" and info["window"] >= n_layers:
            print(f"note: a window of {info['window']} layers covers all {n_layers} of them: "
                  "every layer gets the same effect (use --window 1 on a small model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
