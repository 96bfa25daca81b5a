"""Save a baseline selection in the layout ``dualsft select`` writes, so ``dualsft train`` runs on it:

    <dir>/subset.jsonl       the chosen pool records (original fields) + "index" + "score", pool order
    <dir>/mask.safetensors   the mask (selection.mask format); absent for "full" and "lora"
    <dir>/summary.json       methods, budgets, trainable count, cost record, how to train it
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from dualsft.baselines.registry import BaselineSelection
from dualsft.data.formats import Example
from dualsft.errors import ConfigError
from dualsft.io import write_json, write_jsonl
from dualsft.selection.mask import save_mask


def subset_rows(selection: BaselineSelection, pool: Sequence[Example]) -> list[dict]:
    """Original record of every chosen example + its stable "index" + "score" (None when unscored)."""
    return chosen_rows(selection.subset, selection.subset_scores, pool)


def chosen_rows(subset: Sequence[int], scores: dict[int, float] | None, pool: Sequence[Example]) -> list[dict]:
    """``subset_rows`` for a bare subset (stable indices) and its optional {index: score}."""
    by_index = {e.index: e for e in pool}
    missing = [i for i in subset if i not in by_index]
    if missing:
        raise ConfigError(f"the selection names {len(missing)} example(s) not in the pool (e.g. {missing[:5]}): "
                          "pass the same pool the batches were built from")
    scores = scores or {}
    return [{**by_index[i].record, "index": i, "score": scores.get(i)} for i in subset]


def train_hint(selection: BaselineSelection) -> str:
    """The `dualsft train` options that train this selection."""
    if selection.param_method == "lora":
        return f"--method lora --lora-r {selection.info.get('lora_rank')}"
    if selection.mask is None:
        return "--mask none"
    return ""


def write_mask(out_dir: Path, mask: dict | None, shapes: dict[str, tuple[int, ...]]) -> None:
    """out_dir/mask.safetensors from ``mask`` ({name: flat indices}); None (train every entry / LoRA) removes a
    stale mask left by an earlier method, so it cannot be trained by mistake."""
    path = out_dir / "mask.safetensors"
    if mask is not None:
        save_mask(path, mask, shapes)
    else:
        path.unlink(missing_ok=True)


def write_selection(out_dir: str | os.PathLike, selection: BaselineSelection, pool: Sequence[Example]) -> Path:
    """Write subset.jsonl, mask.safetensors (if any) and summary.json into ``out_dir``; returns it."""
    out = Path(out_dir)
    write_jsonl(out / "subset.jsonl", subset_rows(selection, pool))
    write_mask(out, selection.mask, selection.shapes)
    write_json(out / "summary.json", {
        "method": f"{selection.data_method}+{selection.param_method}", "data_method": selection.data_method,
        "param_method": selection.param_method, "order": selection.order, "b": len(selection.subset),
        "k": selection.info.get("k"), "trainable": selection.trainable, "info": selection.info,
        "cost": selection.cost, "train_options": train_hint(selection)})
    return out
