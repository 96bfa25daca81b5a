"""Parameter-axis baselines: which k entries to train (mask = {name: sorted flat indices}).

    random     k entries uniformly over all d trainable entries (seeded)
    magnitude  top-k |θ0|  (the weights training starts from)
    sift       top-k |G|, G = Σ_{n∈D'} g_n at the scoring checkpoint (D' = the pool, or the chosen subset
               in less→sift): one gradient pass (SIFT's gradient-magnitude rule)
    full       no mask (every entry trains)
    lora       no mask: LoRA through peft at the rank whose trainable count best fits k without exceeding it
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dualsft.baselines.budget import topk_entries
from dualsft.baselines.cost import Cost
from dualsft.baselines.pergrad import _conv1d_type
from dualsft.scoring.stats import gradient_sum

Batch = dict[str, torch.Tensor]


Quotas = tuple[float, float]  # (quota_layer, quota_module) of selection.policy; (0, 0) = one global top-k


def random_mask(params: Mapping[str, torch.Tensor], k: int, seed: int, quotas: Quotas = (0.0, 0.0)) -> dict[str, torch.Tensor]:
    """k entries drawn uniformly without replacement from all trainable entries (a seeded uniform score per
    entry, then the shared top-k rule). Depends only on (seed, parameter names and shapes)."""
    g = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(params[n].shape, generator=g) for n in sorted(params)}
    return topk_entries(scores, k, *quotas)


def magnitude_mask(params: Mapping[str, torch.Tensor], k: int, quotas: Quotas = (0.0, 0.0)) -> dict[str, torch.Tensor]:
    """Top-k |θ| over all entries of ``params`` (pass the base model's θ0)."""
    return topk_entries({n: p.detach().abs().float() for n, p in params.items()}, k, *quotas)


def sift_mask(model: torch.nn.Module, batches: Sequence[Batch], params: Mapping[str, torch.nn.Parameter], k: int,
              cost: Cost, quotas: Quotas = (0.0, 0.0)) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Top-k |G| with G = Σ_n g_n over ``batches`` (float32). Returns (mask, G). One forward+backward per batch."""
    G = gradient_sum(model, batches, params)
    for b in batches:
        cost.count(int(b["input_ids"].shape[0]), backward=True)
    return topk_entries({n: g.abs() for n, g in G.items()}, k, *quotas), G


def lora_layer_dims(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every layer peft's "all-linear" wraps: nn.Linear and Conv1D except the output head."""
    conv1d = _conv1d_type()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    dims = []
    for mod in model.modules():
        if mod is head:
            continue
        if isinstance(mod, torch.nn.Linear):
            dims.append((mod.in_features, mod.out_features))
        elif conv1d is not None and isinstance(mod, conv1d):
            dims.append((mod.weight.shape[0], mod.weight.shape[1]))
    return dims


def lora_trainable_count(model: torch.nn.Module, r: int) -> int:
    """Trainable entries of LoRA rank r on all linear layers: Σ r·(in + out) (A [r, in], B [out, r])."""
    return sum(r * (i + o) for i, o in lora_layer_dims(model))


def lora_rank_for_budget(model: torch.nn.Module, k: int) -> tuple[int, int]:
    """(r, count): the largest rank whose trainable count is ≤ k (r = 1 if even rank 1 exceeds k)."""
    per_rank = lora_trainable_count(model, 1)
    r = max(1, k // per_rank) if per_rank else 1
    return r, lora_trainable_count(model, r)
