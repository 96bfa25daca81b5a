"""Budgets and top-k for the baselines: thin wrappers over dualsft.selection, so every method (DualSFT
and each baseline) shares one budget rule and one tie-break:
- a budget in (0, 1] is a fraction of the total (round half up), above 1 a whole count (selection.topk);
- mask: top-k entries by score, ties to the lexicographically earlier parameter name, then the lower flat
  index; no layer/module quotas unless asked (the original baselines rank globally);
- subset: top-b examples by score, ties to the earlier pool position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dualsft.errors import BudgetError
from dualsft.selection.policy import MaskSpec, select_mask, select_subset
from dualsft.selection.topk import resolve_budget as _resolve


def resolve_budget(budget: float | int, total: int, what: str = "budget") -> int:
    """An exact count from a fraction in (0, 1] or a whole count > 1 of ``total`` (selection's rule)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise BudgetError(f"{what} must be a fraction in (0, 1] or a count, got {budget!r}")
    return _resolve(float(budget), total, what, "items")


def topk_entries(scores: Mapping[str, torch.Tensor], k: int, quota_layer: float = 0.0,
                 quota_module: float = 0.0) -> dict[str, torch.Tensor]:
    """Top-k of ``scores`` ({name: tensor}, consumed: pass fresh tensors) -> {name: sorted compact flat
    indices}, exactly k entries in total (selection.policy.select_mask, element granularity)."""
    spec = MaskSpec(budget=1.0, sign="signed", quota_layer=quota_layer, quota_module=quota_module)
    d = sum(t.numel() for t in scores.values())
    if not 1 <= k <= d:
        raise BudgetError(f"parameter budget k={k} must be between 1 and d={d}")
    return select_mask(dict(scores), spec, consume=True, k=k).indices


def top_b(scores: torch.Tensor, indices: Sequence[int], b: int) -> list[int]:
    """Top-b stable indices by score [N] (ties to the earlier position), in pool (batch) order."""
    if not 1 <= b <= len(indices):
        raise BudgetError(f"data budget b={b} must be between 1 and N={len(indices)}")
    chosen = select_subset(scores.double(), int(b))
    return [int(indices[int(p)]) for p in chosen.positions]
