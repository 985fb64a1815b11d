"""Result tables (Markdown) and plots (PNG) from an evaluation's summary and per-record rows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _cell(value: Any, scale: float = 100.0) -> str:
    """Format a metric value scaled (x100 by default), or a dash when absent."""
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    text = f"{float(value) * scale:.2f}"
    return "0.00" if text == "-0.00" else text  # a tiny negative magnitude rounds to zero


def markdown_table(summary: Mapping[str, Any], method: str) -> str:
    """Render a summary as Markdown: the KnowEdit layout, then every metric.

    The first table has KnowEdit's columns (Edit Succ., Portability, Locality, Fluency) with
    Generalization after Edit Succ. (the README's method table), x100 as the KnowEdit and LTE
    papers report them; the second lists every metric pre and post edit
    (x100 too, but perplexity).

    Args:
        summary: ``summary.json`` content: metric name -> value (``None`` when undefined), a
            ``"pre"`` mapping of pre-edit values and non-metric entries (dicts, ``n_records``).
        method: Row label.

    Returns:
        The Markdown text.
    """
    metrics = {
        k: v
        for k, v in summary.items()
        if k != "n_records" and (v is None or isinstance(v, (int, float)))
    }
    pre = summary.get("pre", {})
    lines = [
        "| Method | Edit Succ. | Generalization | Portability | Locality | Fluency |",
        "|---|---|---|---|---|---|",
        "| {} | {} | {} | {} | {} | {} |".format(
            method,
            _cell(metrics.get("reliability")),
            _cell(metrics.get("generalization")),
            _cell(metrics.get("portability")),
            _cell(metrics.get("locality")),
            _cell(metrics.get("fluency")),
        ),
        "",
        "| Metric | Pre-edit | Post-edit |",
        "|---|---|---|",
    ]
    for name in metrics:
        scale = 1.0 if name == "perplexity" else 100.0
        lines.append(
            f"| {name} | {_cell(pre.get(name), scale)} | {_cell(metrics[name], scale)} |"
        )
    return "\n".join(lines)


def sequential_curves(
    rows: Sequence[Mapping[str, Any]], names: Sequence[str]
) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """Mean post-edit value of each metric against the number of sequential edits.

    When records were scored after different numbers of edits (``after_each``), the x axis is
    that number; otherwise (every record scored after its whole group) it is the position of the
    record's edit in its group, 1 being the oldest edit, which shows how earlier edits survive
    later ones.

    Args:
        rows: Per-record rows (``records.jsonl`` lines).
        names: Metrics to plot.

    Returns:
        ``(x label, {metric: [(x, mean value), ...]})``.
    """
    applied = {int(r["edits_applied"]) for r in rows}
    if len(applied) > 1:
        label, key = "edits applied when scored", "edits_applied"
    else:
        label, key = "position of the edit in its group (1 = oldest)", "position"
    curves: dict[str, list[tuple[int, float]]] = {}
    for name in names:
        buckets: dict[int, list[float]] = defaultdict(list)
        for r in rows:
            value = r["post"].get(name)
            if value is not None:
                x = int(r[key]) + (1 if key == "position" else 0)
                buckets[x].append(float(value))
        if buckets:
            curves[name] = [(x, sum(v) / len(v)) for x, v in sorted(buckets.items())]
    return label, curves


def plot_sequential(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    title: str,
    names: Sequence[str] = ("reliability", "generalization", "locality", "portability"),
) -> Path:
    """Plot :func:`sequential_curves` to a PNG file.

    Args:
        rows: Per-record rows.
        path: Output PNG path.
        title: Plot title.
        names: Metrics to plot.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, curves = sequential_curves(rows, names)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name)
    ax.set_xlabel(label)
    ax.set_ylabel("mean post-edit value")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
