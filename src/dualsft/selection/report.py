"""What a selection contains: counts per layer and module group, the subset's composition by pool task,
source and answer type (beside the pool's), and the layer x module-group mask-density heat-map
(summary.json and mask_density.png)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dualsft.selection.names import GROUPS, locate

NO_LAYER = "none"  # row of the heat-map / key of per_layer for parameters outside transformer layers


def mask_counts(indices: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Selected and total entries per layer, per module group, per (layer, group) and per parameter.

    Layers are keyed by their index as a string, ``none`` for embeddings/final norm/head."""
    per_layer: dict[str, list[int]] = {}
    per_group: dict[str, list[int]] = {}
    cells: dict[tuple[str, str], list[int]] = {}
    per_param = {}
    for name, shape in shapes.items():
        loc = locate(name)
        layer = NO_LAYER if loc.layer is None else str(loc.layer)
        sel = int(indices[name].numel()) if name in indices else 0
        tot = int(torch.Size(shape).numel())
        for table, key in ((per_layer, layer), (per_group, loc.group), (cells, (layer, loc.group))):
            acc = table.setdefault(key, [0, 0])  # type: ignore[arg-type]
            acc[0] += sel
            acc[1] += tot
        per_param[name] = sel
    fmt = lambda t: {k: {"selected": s, "total": n, "density": s / n if n else 0.0} for k, (s, n) in t.items()}  # noqa: E731
    layer_order = sorted((k for k in per_layer if k != NO_LAYER), key=int) + ([NO_LAYER] if NO_LAYER in per_layer else [])
    return {
        "per_layer": fmt({k: per_layer[k] for k in layer_order}),
        "per_group": fmt({g: per_group[g] for g in GROUPS if g in per_group}),
        "per_layer_group": {f"{lay}/{g}": {"selected": s, "total": n} for (lay, g), (s, n) in cells.items()},
        "per_param": per_param,
    }


def composition(pool_values: list[str], chosen_values: list[str], n_pool: int, n_chosen: int) -> dict[str, dict[str, float]]:
    """Per value: its count in the pool and in the subset, its share of each (over ``n_pool`` pool and
    ``n_chosen`` subset examples) and the fraction of the pool's examples with that value that were chosen."""
    pool, sub = Counter(pool_values), Counter(chosen_values)
    return {v: {"pool": pool[v], "selected": sub.get(v, 0), "share_of_pool": pool[v] / max(n_pool, 1),
                "share_of_subset": sub.get(v, 0) / max(n_chosen, 1),
                "share_of_value_selected": sub.get(v, 0) / pool[v]} for v in sorted(pool)}


def answer_type_key(record: dict) -> str | None:
    """``task/answer_type`` (e.g. ``chain_sum/2-digit``: answer types are defined per task, data.tasks),
    or None for a record without an answer type."""
    at = record.get("answer_type")
    return None if at is None else f"{record.get('task')}/{at}"


def subset_overlap(pool_records: list[dict], chosen: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """The subset's composition beside the pool's, for each field present in the pool: ``task``,
    ``source`` and, where records carry one, ``answer_type`` (keyed ``task/answer_type``; records
    without one are left out of that table, shares stay over all pool / subset examples). Each value
    maps to ``composition``'s counts and shares."""
    out = {}
    N, b = len(pool_records), len(chosen)
    for fld in ("task", "source"):
        if any(fld in r for r in pool_records):
            out[fld] = composition([str(r.get(fld)) for r in pool_records], [str(r.get(fld)) for r in chosen], N, b)
    typed = [k for k in map(answer_type_key, pool_records) if k is not None]
    if typed:
        out["answer_type"] = composition(typed, [k for k in map(answer_type_key, chosen) if k is not None], N, b)
    return out


def composition_table(overlap: dict[str, dict[str, dict[str, float]]], field: str) -> list[str]:
    """Markdown lines: one row per value of ``field`` in a ``subset_overlap`` result (pool count and share,
    subset count and share); [] when the field is absent."""
    rows = overlap.get(field) or {}
    if not rows:
        return []
    lines = [f"| {field.replace('_', ' ')} | pool | pool share | selected | subset share |", "|---|---:|---:|---:|---:|"]
    for v, c in rows.items():
        lines.append(f"| {v} | {c['pool']} | {c['share_of_pool']:.0%} | {c['selected']} | {c['share_of_subset']:.0%} |")
    return lines


def density_grid(counts: dict[str, Any]) -> tuple[list[str], list[str], list[list[float]]]:
    """(row labels = layers + none, column labels = groups present, density grid; NaN where no parameter)."""
    rows = list(counts["per_layer"])
    cols = list(counts["per_group"])
    cells = counts["per_layer_group"]
    grid = [[cells[f"{r}/{c}"]["selected"] / cells[f"{r}/{c}"]["total"] if f"{r}/{c}" in cells else float("nan")
             for c in cols] for r in rows]
    return rows, cols, grid


def plot_density(counts: dict[str, Any], path: str | Path, title: str) -> None:
    """Write the layer x module-group mask-density heat-map as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols, grid = density_grid(counts)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(cols), 1.2 + 0.22 * len(rows)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 20 else 9)
    ax.set_xlabel("module group")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction of entries selected")
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
