"""Every baseline at exactly the matched budget; determinism; each rule checked against a direct computation."""

from __future__ import annotations

import copy

import pytest
import torch

from dualsft.baselines import (
    BaselineContext,
    DualSFTScores,
    LessConfig,
    make_context,
    select_baseline,
    select_hybrid,
    subset_batches,
    write_selection,
)
from dualsft.baselines.budget import resolve_budget
from dualsft.baselines.data import pool_indices
from dualsft.baselines.params import lora_trainable_count
from dualsft.data.formats import load_examples, normalise_record
from dualsft.errors import BudgetError, ConfigError
from dualsft.io import read_json, read_jsonl, save_tensors, write_jsonl
from dualsft.losses import per_example_loss
from dualsft.scoring.stats import trainable_params
from dualsft.selection.mask import load_mask
from dualsft.selection.policy import MaskSpec, select_mask, select_subset
from dualsft.testing import micro_llama, toy_records

N_POOL = 20


@pytest.fixture(scope="module")
def models():
    base = micro_llama(seed=0)
    warm = copy.deepcopy(base)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in warm.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return base, warm


@pytest.fixture
def ctx_for(models, pool, target, fake_curvature):
    base, warm = models

    def build(data_budget=0.25, param_budget=0.1, seed=0) -> BaselineContext:
        return make_context(warm, pool, data_budget, param_budget, target_batches=target, base_model=base,
                            curvature=fake_curvature(warm), seed=seed, less=LessConfig(dim=128))

    return build


def _d(model) -> int:
    return sum(p.numel() for p in trainable_params(model).values())


def _k_of(mask) -> int:
    return sum(int(v.numel()) for v in mask.values())


def _check_mask(mask, model, k):
    params = trainable_params(model)
    assert _k_of(mask) == k
    for n, idx in mask.items():
        i = idx.long()
        assert torch.all(i[1:] > i[:-1]) and int(i.min()) >= 0 and int(i.max()) < params[n].numel()


@pytest.mark.parametrize("budgets", [(0.25, 0.1), (7, 1234)])
@pytest.mark.parametrize("data,param,order", [
    ("random", "random", "independent"), ("loss", "magnitude", "independent"), ("less", "sift", "independent"),
    ("less", "sift", "data_first"), ("less", "sift", "param_first")])
def test_exact_matched_budgets(ctx_for, models, budgets, data, param, order):
    ctx = ctx_for(*budgets)
    b = resolve_budget(budgets[0], N_POOL)
    k = resolve_budget(budgets[1], _d(models[0]))
    assert (ctx.b, ctx.k) == (b, k)
    sel = select_baseline(data, param, ctx, order)
    assert len(sel.subset) == b and len(set(sel.subset)) == b
    assert set(sel.subset) <= {int(i) for bt in ctx.pool_batches for i in bt["index"]}
    _check_mask(sel.mask, models[0], k)
    assert sel.trainable == k
    cost = sel.cost
    assert [s["stage"].split(":")[0] for s in cost["stages"]] == (["param", "data"] if order == "param_first"
                                                                   else ["data", "param"])
    for key in ("forward_passes", "backward_passes", "examples_processed"):
        assert cost[key] == sum(s[key] for s in cost["stages"])


def test_budget_resolution_errors():
    assert resolve_budget(0.1, 25) == 3 and resolve_budget(1.0, 25) == 25 and resolve_budget(5, 25) == 5
    assert resolve_budget(1, 25) == 25  # selection's rule: 1 is the fraction "all"
    for bad in (0, 26, 0.0, -0.5, 2.5, float("nan"), True, "3"):
        with pytest.raises(BudgetError):
            resolve_budget(bad, 25)


def test_deterministic_and_seeded(ctx_for):
    for data, param in (("random", "random"), ("less", "sift"), ("loss", "magnitude")):
        a = select_baseline(data, param, ctx_for(seed=1))
        b = select_baseline(data, param, ctx_for(seed=1))
        assert a.subset == b.subset and all(torch.equal(a.mask[n], b.mask[n]) for n in a.mask)
    r1, r2 = select_baseline("random", "random", ctx_for(seed=1)), select_baseline("random", "random", ctx_for(seed=2))
    assert r1.subset != r2.subset
    assert any(n not in r2.mask or not torch.equal(r1.mask[n], r2.mask[n]) for n in r1.mask)


def test_loss_picks_highest_base_loss(ctx_for, models, pool):
    ctx = ctx_for(6)
    sel = select_baseline("loss", "full", ctx)
    with torch.no_grad():
        losses = {int(i): float(l) for b in pool for i, l in zip(b["index"], per_example_loss(models[0], b))}
    want = sorted(losses, key=lambda i: -losses[i])[:6]
    assert sorted(sel.subset) == sorted(want) and sel.subset == sorted(sel.subset)  # pool order
    assert all(abs(sel.subset_scores[i] - losses[i]) < 1e-6 for i in want)
    assert sel.mask is None and sel.trainable == _d(models[0]) and sel.cost["backward_passes"] == 0


def _topk_direct(scores: dict[str, torch.Tensor], k: int) -> set[tuple[str, int]]:
    flat = torch.cat([s.flatten() for s in scores.values()])
    top = torch.topk(flat, k).indices.tolist()
    names = [(n, j) for n, s in scores.items() for j in range(s.numel())]
    return {names[i] for i in top}


def _as_set(mask) -> set[tuple[str, int]]:
    return {(n, int(j)) for n, idx in mask.items() for j in idx}


def test_magnitude_is_topk_abs_theta0(ctx_for, models):
    sel = select_baseline("random", "magnitude", ctx_for(param_budget=500))
    want = _topk_direct({n: p.detach().abs() for n, p in trainable_params(models[0]).items()}, 500)
    assert _as_set(sel.mask) == want


def _grad_sum_direct(model, batches):
    params = trainable_params(model)
    G = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in batches:
        for r in range(b["input_ids"].shape[0]):  # one example at a time: an independent computation
            keep = b["attention_mask"][r].bool()
            one = {k: b[k][r][keep].unsqueeze(0) for k in ("input_ids", "attention_mask", "labels")}
            grads = torch.autograd.grad(per_example_loss(model, one).sum(), list(params.values()))
            for n, g in zip(params, grads):
                G[n] += g
    return G


def test_sift_global_is_topk_abs_G_and_hybrids_compose(ctx_for, models, pool):
    ctx = ctx_for(5, 300)
    sift = select_baseline("random", "sift-global", ctx)
    G = _grad_sum_direct(models[1], pool)
    want = _topk_direct({n: g.abs() for n, g in G.items()}, 300)
    # G agrees with the direct sum to float32 rounding; allow a swap at the k-th boundary only
    assert len(_as_set(sift.mask) ^ want) <= 2

    less_sift = select_hybrid("less→sift-global", ctx)
    less_alone = select_baseline("less", "full", ctx)
    assert less_sift.subset == less_alone.subset
    G_S = _grad_sum_direct(models[1], subset_batches(pool, less_sift.subset))
    assert len(_as_set(less_sift.mask) ^ _topk_direct({n: g.abs() for n, g in G_S.items()}, 300)) <= 2
    assert less_sift.cost["stages"][1]["examples_processed"] == 5

    sift_less = select_hybrid("sift-global->less", ctx)
    assert _as_set(sift_less.mask) == _as_set(sift.mask)
    from dualsft.baselines.less import less_scores
    scores, idx = less_scores(models[1], pool, ctx.target_batches, ctx.less, ctx.seed, ctx.curvature,
                              mask=sift.mask)
    assert set(sift_less.subset) == set(sorted(idx, key=lambda i: -float(scores[idx.index(i)]))[:5])


def test_all_full_lora(ctx_for, models):
    ctx = ctx_for(0.25, 0.1)
    sel = select_baseline("all", "lora", ctx)
    assert sorted(sel.subset) == list(range(N_POOL)) and sel.mask is None
    r = sel.info["lora_rank"]
    assert sel.trainable == lora_trainable_count(models[0], r) <= ctx.k < lora_trainable_count(models[0], r + 1)
    from dualsft.training.lora import wrap_lora
    peft_model = wrap_lora(copy.deepcopy(models[0]), r=r)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == sel.trainable


def test_writer_layout(ctx_for, tmp_path):
    pool_examples = [normalise_record(r, "toy", i) for i, r in enumerate(toy_records(N_POOL, seed=1))]
    sel = select_baseline("loss", "random", ctx_for(5, 100))
    out = write_selection(tmp_path / "selection", sel, pool_examples)
    rows = read_jsonl(out / "subset.jsonl")
    assert [r["index"] for r in rows] == sel.subset and all("instruction" in r and "score" in r for r in rows)
    assert [e.index for e in load_examples(out / "subset.jsonl")] == sel.subset
    mask, shapes = load_mask(out / "mask.safetensors")
    assert _k_of(mask) == 100 and shapes
    summary = read_json(out / "summary.json")
    assert summary["b"] == 5 and summary["k"] == 100 and summary["cost"]["forward_passes"] > 0
    full = select_baseline("random", "full", ctx_for(5, 100))
    write_selection(out, full, pool_examples)
    assert not (out / "mask.safetensors").exists()
    assert read_json(out / "summary.json")["train_options"] == "--mask none"


def test_dualsft_is_a_registry_method_that_ranks_the_saved_scores(ctx_for, models, tmp_path):
    """The "dualsft" selectors read RUN/scores and rank them as `dualsft select` does: the subset is the top-b
    of signed φ_data (not |φ_data|), the mask select_mask under the context's policy at exactly k entries."""
    base, warm = models
    ctx = ctx_for(0.25, 0.1)
    g = torch.Generator().manual_seed(3)
    idx = pool_indices(ctx.pool_batches)
    phi_data = torch.randn(len(idx), generator=g, dtype=torch.float64) - 1.0  # mostly negative
    write_jsonl(tmp_path / "data_scores.jsonl", [{"index": i, "score": float(s)} for i, s in zip(idx, phi_data)])
    phi_param = {n: torch.randn(p.shape, generator=g) for n, p in trainable_params(warm).items()}
    save_tensors(tmp_path / "param_scores.safetensors", phi_param)
    with pytest.raises(ConfigError, match="DualSFTScores"):
        select_baseline("dualsft", "dualsft", ctx)
    spec = MaskSpec(sign="abs", quota_layer=0.2, quota_module=0.2)
    ctx.dualsft = DualSFTScores(tmp_path, spec)
    sel = select_baseline("dualsft", "dualsft", ctx)
    top = select_subset(phi_data, ctx.b).positions.tolist()
    assert sel.subset == [idx[p] for p in top] and sel.subset_scores == {idx[p]: float(phi_data[p]) for p in top}
    assert sel.subset != sorted(idx[p] for p in torch.sort(phi_data.abs(), descending=True).indices[:ctx.b].tolist())
    expected = select_mask({n: t.clone() for n, t in phi_param.items()}, spec, k=ctx.k).indices
    assert {n: t.tolist() for n, t in sel.mask.items()} == {n: t.tolist() for n, t in expected.items()}
    _check_mask(sel.mask, base, ctx.k)
    mixed = select_baseline("dualsft", "random", ctx)  # one axis DualSFT, the other a baseline
    assert mixed.subset == sel.subset and mixed.mask is not None and mixed.cost["stages"][0]["examples_processed"] == 0


def test_sift_is_the_published_rule_first_batch_at_theta0(ctx_for, pool):
    """`sift` in the registry is SIFT as published (baselines.params.sift_published_mask on the first batch)."""
    from dualsft.baselines.cost import Cost
    from dualsft.baselines.params import sift_published_mask

    ctx = ctx_for(5, 300)
    sel = select_baseline("random", "sift", ctx)
    want, _ = sift_published_mask(ctx.theta0, pool[0], ctx.k, Cost().start())
    assert _as_set(sel.mask) == _as_set(want) and sel.trainable == ctx.k
