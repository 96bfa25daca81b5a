"""Parameter-axis baselines: which k entries to train (mask = {name: sorted flat indices}).

    random     k entries uniformly over all d trainable entries (seeded)
    magnitude  top-k |θ0|  (the weights training starts from)
    sift       SIFT as published (Song et al., arXiv 2312.11875; ``sift_published_mask``): |grad| of the
               FIRST batch of the training data at θ0, projection matrices only, one density for every matrix
    sift-global  the earlier variant (``sift_mask``): one global top-k |G| over every trainable tensor,
               G = Σ_{n∈D'} g_n at the scoring checkpoint (D' = the pool, or the chosen subset in less→sift)
    full       no mask (every entry trains)
    lora       no mask: LoRA through peft at the rank whose trainable count best fits k without exceeding it
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dualsft.baselines.budget import topk_entries
from dualsft.baselines.cost import Cost
from dualsft.baselines.pergrad import _conv1d_type
from dualsft.errors import BudgetError
from dualsft.scoring.stats import gradient_sum, trainable_params
from dualsft.selection.names import group_of

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


PROJECTION_GROUPS = frozenset({"q", "k", "v", "qkv", "o", "gate", "up", "down"})


def projection_matrices(params: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the attention and MLP projection weights (q k v o gate up down, fused qkv; 2-D): the
    only tensors SIFT trains. Embeddings, norms, biases and the LM head are left out (frozen)."""
    return [n for n, p in params.items() if p.dim() == 2 and group_of(n) in PROJECTION_GROUPS]


def equal_density_budgets(sizes: Mapping[str, int], k: int) -> dict[str, int]:
    """Split k entries over matrices of ``sizes`` {name: numel} at one density ρ = k / Σ numel.

    Matrix m gets floor(ρ·numel_m) plus one for the largest remainders (ties to the earlier name), so the
    counts sum to exactly k and each is within one entry of ρ·numel_m (SIFT itself takes int(ρ·numel)+1
    per matrix, which overshoots k by up to one entry per matrix)."""
    total = sum(sizes.values())
    if not 1 <= k <= total:
        raise BudgetError(f"parameter budget k={k} must be between 1 and the {total} entries of the "
                          "projection matrices (SIFT trains nothing else)")
    exact = {n: k * m / total for n, m in sizes.items()}
    out = {n: int(e) for n, e in exact.items()}
    by_remainder = sorted(sizes, key=lambda n: (-(exact[n] - out[n]), n))
    for n in by_remainder[:k - sum(out.values())]:
        out[n] += 1
    return out


def per_matrix_topk(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """{name: sorted flat indices}: each matrix's own top-k_m of ``scores`` (k_m from
    ``equal_density_budgets``; the shared tie-break: lower flat index first). Matrices with k_m = 0 are
    left out of the mask (frozen)."""
    budgets = equal_density_budgets({n: s.numel() for n, s in scores.items()}, k)
    mask = {}
    for name, k_m in budgets.items():
        if k_m > 0:
            mask.update(topk_entries({name: scores[name].detach().float().clone()}, k_m))
    return mask


def sift_published_mask(model: torch.nn.Module, first_batch: Batch, k: int,
                        cost: Cost) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SIFT as published: per-matrix top-|g| of the first training batch at θ0 (docs/baselines.md).

    ``model`` is θ0 (the weights training starts from) and ``first_batch`` the first batch of the data
    that will be trained on. g = ∇ Σ_{n∈batch} l_n [shaped like each weight], on the projection matrices
    only (``projection_matrices``); every matrix gets the same density, k in total (``per_matrix_topk``).
    Returns (mask {name: sorted flat indices}, g {name: float32 gradient}). One forward+backward of one batch.
    """
    params = trainable_params(model)
    names = projection_matrices(params)
    if not names:
        raise BudgetError("SIFT found no projection matrices (q/k/v/o/gate/up/down) in the model; "
                          "use sift-global, which ranks every trainable tensor")
    g = gradient_sum(model, [first_batch], {n: params[n] for n in names})
    cost.count(int(first_batch["input_ids"].shape[0]), backward=True)
    return per_matrix_topk({n: t.abs() for n, t in g.items()}, k), g


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
