"""Human-readable results: markdown tables and PNG plots (matplotlib, Agg backend). Pure formatting:
inputs are the JSON trees other stages wrote; outputs are strings and image files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def fmt_stat(s: Any, digits: int = 3, pct: bool = False) -> str:
    """``{"mean", "std", "n"}`` (or a number) -> "0.412 ± 0.020 (n=64)"; percentages when ``pct``."""
    if s is None:
        return "—"
    if isinstance(s, (int, float)):
        return f"{100 * s:.1f}%" if pct else f"{s:.{digits}g}"
    mean, std, n = s.get("mean"), s.get("std"), s.get("n")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    scale, unit = (100.0, "%") if pct else (1.0, "")
    txt = f"{scale * mean:.1f}{unit}" if pct else f"{mean:.{digits}f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        txt += f" ± {scale * std:.1f}{unit}" if pct else f" ± {std:.{digits}f}"
    if n is not None:
        txt += f" (n={n})"
    return txt


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def get(tree: Any, *path: str) -> Any:
    """tree[path[0]][path[1]]..., or None where a key is missing."""
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: str | Path, xlabel: str, ylabel: str, title: str) -> None:
    """Label the axes, save the figure as PNG and free it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scatter_plot(path: str | Path, points: dict[str, tuple[float, float, float, float]], xlabel: str, ylabel: str,
                 title: str) -> None:
    """Labelled points with error bars: {label: (x, x_err, y, y_err)} -> PNG."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for label, (x, xe, y, ye) in points.items():
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", capsize=3, label=label)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.grid(alpha=0.3)
    _finish(plt, fig, ax, path, xlabel, ylabel, title)


def histogram_plot(path: str | Path, values: dict[str, Sequence[float]], xlabel: str, title: str, bins: int = 40) -> None:
    """Overlaid histograms of several score distributions -> PNG."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, v in values.items():
        if len(v):
            ax.hist(list(v), bins=bins, alpha=0.55, label=label)
    ax.legend(fontsize=8)
    _finish(plt, fig, ax, path, xlabel, "count", title)
