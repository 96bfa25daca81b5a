"""Data-axis baselines without gradients: random, highest base loss, all. (LESS lives in less.py.)"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dualsft.baselines.budget import top_b
from dualsft.baselines.cost import Cost
from dualsft.errors import BudgetError
from dualsft.losses import per_example_loss

Batch = dict[str, torch.Tensor]


def pool_indices(batches: Sequence[Batch]) -> list[int]:
    """Stable example indices of the pool, in batch order."""
    return [int(i) for b in batches for i in b["index"]]


def random_subset(indices: Sequence[int], b: int, seed: int) -> list[int]:
    """b stable indices drawn uniformly without replacement (seeded), in pool order."""
    if not 1 <= b <= len(indices):
        raise BudgetError(f"data budget b={b} must be between 1 and N={len(indices)}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(indices), generator=g)[:b]
    return [int(indices[i]) for i in sorted(pick.tolist())]


@torch.no_grad()
def example_losses(model: torch.nn.Module, batches: Sequence[Batch], cost: Cost) -> tuple[torch.Tensor, list[int]]:
    """l_n under ``model`` for every example (forward only): (losses [N] float64, stable indices [N])."""
    device = next(model.parameters()).device
    out = []
    for b in batches:
        inputs = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        out.append(per_example_loss(model, inputs).double().cpu())
        cost.count(int(b["input_ids"].shape[0]), backward=False)
    return torch.cat(out), pool_indices(batches)


def loss_subset(base_model: torch.nn.Module, batches: Sequence[Batch], b: int,
                cost: Cost) -> tuple[list[int], dict[int, float]]:
    """The b examples with the highest loss under the base model θ0, in pool order, with their losses."""
    losses, idx = example_losses(base_model, batches, cost)
    chosen = top_b(losses, idx, b)
    by_index = dict(zip(idx, losses.tolist()))
    return chosen, {i: by_index[i] for i in chosen}
