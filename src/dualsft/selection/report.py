"""What a selection contains: counts per layer and module group, subset overlap with pool tasks/sources,
and the layer x module-group mask-density heat-map (summary.json and mask_density.png)."""

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


def subset_overlap(pool_records: list[dict], chosen: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """For each of the fields ``task`` and ``source`` present in the pool: per value, how many pool and
    subset examples carry it and the share of the subset it makes up."""
    out = {}
    for fld in ("task", "source"):
        if not any(fld in r for r in pool_records):
            continue
        pool = Counter(str(r.get(fld)) for r in pool_records)
        sub = Counter(str(r.get(fld)) for r in chosen)
        out[fld] = {v: {"pool": pool[v], "selected": sub.get(v, 0),
                        "share_of_subset": sub.get(v, 0) / max(len(chosen), 1),
                        "share_of_value_selected": sub.get(v, 0) / pool[v]} for v in sorted(pool)}
    return out


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
