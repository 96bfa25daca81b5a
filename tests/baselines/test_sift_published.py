"""SIFT as published: |grad| of the first batch at θ0, projection matrices only, one density for all."""

from __future__ import annotations

import pytest
import torch

from dualsft.baselines.cost import Cost
from dualsft.baselines.params import equal_density_budgets, per_matrix_topk, projection_matrices, sift_published_mask
from dualsft.errors import BudgetError
from dualsft.losses import per_example_loss
from dualsft.scoring.stats import trainable_params
from dualsft.testing import micro_gpt2, micro_llama


def first_batch_grad_direct(model, batch) -> dict[str, torch.Tensor]:
    """The oracle: one plain backward of the summed loss, every parameter's .grad."""
    model.zero_grad()
    per_example_loss(model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def topk_direct(score: torch.Tensor, k: int) -> set[int]:
    """Top-k flat positions by a full stable sort (descending score, then lower index)."""
    flat = score.flatten().double()
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    return set(order[:k])


@pytest.mark.parametrize("make", [micro_llama, micro_gpt2])
def test_projection_matrices_only(make):
    model = make(seed=0)
    names = projection_matrices(trainable_params(model))
    assert names and all(trainable_params(model)[n].dim() == 2 for n in names)
    for n in names:
        assert not any(w in n for w in ("embed", "wte", "wpe", "norm", "ln_", "lm_head"))
    if make is micro_llama:
        leaves = {n.split(".")[-2] for n in names}
        assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_equal_density_budgets_sum_to_k_and_share_one_density():
    sizes = {"a": 1000, "b": 300, "c": 7, "d": 2048}
    for k in (1, 5, 97, 1000, 3355):
        b = equal_density_budgets(sizes, k)
        assert sum(b.values()) == k
        rho = k / sum(sizes.values())
        assert all(abs(b[n] - rho * m) < 1 for n, m in sizes.items())
    with pytest.raises(BudgetError, match="projection"):
        equal_density_budgets(sizes, 3356)


def test_per_matrix_topk_against_a_sort_oracle():
    g = torch.Generator().manual_seed(0)
    scores = {"x": torch.rand(8, 16, generator=g), "y": torch.rand(4, 4, generator=g).round(decimals=1)}  # ties in y
    mask = per_matrix_topk(scores, 36)
    budgets = equal_density_budgets({n: s.numel() for n, s in scores.items()}, 36)
    assert budgets == {"x": 32, "y": 4}
    for n, idx in mask.items():
        assert set(idx.tolist()) == topk_direct(scores[n], budgets[n])
        assert torch.all(idx[1:] > idx[:-1])
    assert set(per_matrix_topk(scores, 1)) == {"x"}  # y's share rounds to 0 entries: it stays frozen


@pytest.mark.parametrize("make", [micro_llama, micro_gpt2])
def test_sift_mask_is_per_matrix_top_grad_of_the_first_batch(make, make_batches):
    theta0 = make(seed=1)
    batches = make_batches(12, seed=3)
    d_proj = sum(trainable_params(theta0)[n].numel() for n in projection_matrices(trainable_params(theta0)))
    k = d_proj // 20
    cost = Cost()
    mask, grads = sift_published_mask(theta0, batches[0], k, cost)
    assert sum(v.numel() for v in mask.values()) == k
    assert set(mask) <= set(projection_matrices(trainable_params(theta0)))  # embeddings, norms, head frozen
    assert (cost.forward_passes, cost.backward_passes, cost.examples_processed) == (1, 1, batches[0]["input_ids"].shape[0])
    direct = first_batch_grad_direct(theta0, batches[0])
    budgets = equal_density_budgets({n: direct[n].numel() for n in grads}, k)
    for n, g in grads.items():
        assert torch.allclose(g, direct[n], rtol=1e-5, atol=1e-7)
        assert len(set(mask.get(n, torch.empty(0)).tolist()) ^ topk_direct(direct[n].abs(), budgets[n])) <= 2
        assert abs(budgets[n] - k * g.numel() / d_proj) < 1  # the same density in every matrix
    # only the first batch counts: the rest of the data cannot change the mask
    again, _ = sift_published_mask(theta0, batches[0], k, Cost())
    assert all(torch.equal(again[n], mask[n]) for n in mask)
    other, _ = sift_published_mask(theta0, batches[1], k, Cost())
    assert any(not torch.equal(other[n], mask[n]) for n in mask)
