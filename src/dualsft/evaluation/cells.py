"""The cells of `dualsft compare`'s tables: per-item scores of a method over seeds, their mean ± 95%
bootstrap CI and the paired difference DualSFT − baseline (evaluation.stats, docs/method.md §6).

A method's scores for one metric are a matrix x [S seeds, Q test items] read from the evaluation's
``predictions.jsonl`` (one row per example and model). Items are keyed (task, index) and aligned across
seeds and methods, so row s of A pairs with row s of B and column q is the same item in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dualsft.evaluation.evaluate import GENERAL_TASKS
from dualsft.evaluation.stats import Interval, judge, mean_ci, paired_difference
from dualsft.io import read_jsonl

# column -> (which rows, which field, +1 higher is better / -1 lower is better)
ITEM_METRICS: dict[str, tuple[str, str, int]] = {
    "target acc": ("target", "correct", +1),
    "target loss": ("target", "loss", -1),
    "stability loss": ("stability", "loss", -1),
    "general KL": ("general", "kl", -1),
    "HumanEval pass@1": ("general", "passed", +1),  # only with --eval.humaneval
}


def row_group(row: dict) -> str:
    """target (the test split), stability (held-out tasks scored by answer) or general (HumanEval text)."""
    if row.get("split") == "test":
        return "target"
    return "general" if row.get("task") in GENERAL_TASKS else "stability"


def item_scores(predictions: Path, model: str) -> dict[str, dict[tuple[str, int], float]]:
    """{metric: {(task, index): score}} of one evaluated ``model`` label ("tuned", "model") in a
    predictions.jsonl; a metric with no recorded value (e.g. KL without a base model) is absent."""
    out: dict[str, dict[tuple[str, int], float]] = {}
    for r in read_jsonl(predictions):
        if r.get("model") != model:
            continue
        for col, (group, fld, _) in ITEM_METRICS.items():
            v = r.get(fld)
            if row_group(r) == group and v is not None:
                out.setdefault(col, {})[(str(r.get("task")), int(r["index"]))] = float(v)
    return out


def score_matrix(per_seed: list[dict[tuple[str, int], float]], items: list[tuple[str, int]]) -> torch.Tensor:
    """[S, Q] float64: row s = seed s's scores on ``items`` (every seed must have every item)."""
    return torch.tensor([[s[k] for k in items] for s in per_seed], dtype=torch.float64)


def common_items(*runs: list[dict[tuple[str, int], float]]) -> list[tuple[str, int]]:
    """Items scored in every seed of every run given (sorted, so columns line up)."""
    keys = [set(s) for run in runs for s in run]
    return sorted(set.intersection(*keys)) if keys else []


def flipped(d: Interval) -> Interval:
    """B − A from A − B (for a metric where lower is better, judge the flipped difference)."""
    return Interval(-d.mean, -d.high, -d.low, d.level, d.n_seeds, d.n_examples)


def method_cells(scores: dict[str, list[dict]]) -> dict[str, Any]:
    """{metric: Interval.as_dict()} of one method; ``scores``: metric -> per-seed item scores."""
    out = {}
    for col, per_seed in scores.items():
        items = common_items(per_seed)
        if items and len(per_seed) > 0:
            out[col] = mean_ci(score_matrix(per_seed, items)).as_dict()
    return out


def paired_cells(ref: dict[str, list[dict]], other: dict[str, list[dict]]) -> dict[str, Any]:
    """{metric: {"diff": (ref − other) Interval.as_dict(), "verdict": win|tie|loss for ref}}: a loss-like
    metric (lower is better) is judged on other − ref, so "win" always means ref is better."""
    out = {}
    for col, (_, _, sign) in ITEM_METRICS.items():
        a, b = ref.get(col), other.get(col)
        if not a or not b or len(a) != len(b):
            continue
        items = common_items(a, b)
        if not items:
            continue
        d = paired_difference(score_matrix(a, items), score_matrix(b, items))
        out[col] = {"diff": d.as_dict(), "verdict": judge(d if sign > 0 else flipped(d))}
    return out


def fmt_interval(c: dict | None, pct: bool = False, signed: bool = False) -> str:
    """"41.2 [35.0, 47.3]" (percent points when ``pct``); — when missing."""
    if not c:
        return "—"
    k = 100.0 if pct else 1.0
    f = ("{:+.1f}" if signed else "{:.1f}") if pct else ("{:+.3f}" if signed else "{:.3f}")
    return f"{f.format(k * c['mean'])} [{f.format(k * c['low'])}, {f.format(k * c['high'])}]"
