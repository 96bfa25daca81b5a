"""G, u, φ_param, the row-column identity, the surrogate I(m, S), and the first-order prediction."""

from __future__ import annotations

import pytest
import torch
from scoring_helpers import MODELS, toy_batches

from dualsft.losses import per_example_loss
from dualsft.method import combine_u, param_scores, surrogate_improvement
from dualsft.scoring.rows import row_scores
from dualsft.scoring.stats import gradient_sum, target_gradient, trainable_params


def test_trainable_params_tied_once_in_named_order():
    model = MODELS["llama"](tied=True, dtype=torch.float64)
    params = trainable_params(model)
    assert list(params) == [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in params and "model.embed_tokens.weight" in params
    assert len({id(p) for p in params.values()}) == len(params)


def test_gradient_sum_is_sum_of_per_example_grads(tokenizer):
    model = MODELS["gpt2"](tied=True, dtype=torch.float64)
    bs = toy_batches(tokenizer, 5, 2)
    params = trainable_params(model)
    G = gradient_sum(model, bs, params, acc_dtype=torch.float64)
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in bs:
        for i in range(b["input_ids"].shape[0]):
            keep = b["attention_mask"][i].bool()
            one = {k: v[i : i + 1, keep] for k, v in b.items() if k != "index"}
            grads = torch.autograd.grad(per_example_loss(model, one)[0], list(params.values()))
            for n, g in zip(params, grads):
                ref[n] += g
    for n in G:
        assert torch.allclose(G[n], ref[n], rtol=1e-10, atol=1e-13), n
    v = target_gradient(model, bs, params, acc_dtype=torch.float64)
    assert all(torch.allclose(v[n] * 5, G[n]) for n in G)  # v_new is the MEAN


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_row_column_identity(tokenizer, arch, order):
    """Σ_j φ_param[j] = Σ_n φ_data[n] = uᵀG (float64, ≤ 1e-6 relative; measured ~1e-14)."""
    model = MODELS[arch](tied=True, dtype=torch.float64)
    params = trainable_params(model)
    pool, target = toy_batches(tokenizer, 8, 4, seed=0), toy_batches(tokenizer, 4, 4, seed=1)
    v_new = target_gradient(model, target, params, acc_dtype=torch.float64)
    G = gradient_sum(model, pool, params, acc_dtype=torch.float64)
    c = {n: torch.rand(p.shape, dtype=torch.float64) for n, p in params.items()}
    u, v, norms = combine_u(v_new, None, G, c, 1e-2, 1.0, 0.0, order)
    phi = param_scores(u, G)
    rows, _ = row_scores(model, pool, u, method="ghost")
    utg = sum(float((u[n] * G[n]).sum()) for n in u)
    sum_param = sum(float(t.double().sum()) for t in phi.values())
    assert abs(sum_param - utg) <= 1e-6 * abs(utg)
    assert abs(float(rows.sum()) - utg) <= 1e-6 * abs(utg)
    assert (norms["half_eta2_c_G"] > 0) == (order == 2)


def test_combine_u_formula():
    g = torch.Generator().manual_seed(0)
    shape = {"a": (3, 2), "b": (4,)}
    vn, vp, G, c = ({k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shape.items()} for _ in range(4))
    c = {k: t.abs() for k, t in c.items()}
    eta, ln, lp = 0.1, 0.7, 0.3
    u, v, norms = combine_u(vn, vp, G, c, eta, ln, lp, 2)
    for k in shape:
        assert torch.allclose(v[k], ln * vn[k] + lp * vp[k])
        assert torch.allclose(u[k], eta * v[k] - 0.5 * eta**2 * c[k] * G[k])
    expect = sum(float((eta * lp * vp[k]).pow(2).sum()) for k in shape) ** 0.5
    assert norms["eta_lambda_prior_v_prior"] == pytest.approx(expect)
    u1, _, _ = combine_u(vn, vp, None, None, eta, ln, lp, 1)
    assert all(torch.allclose(u1[k], eta * v[k]) for k in shape)


def test_surrogate_improvement_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    shape = {"w": (5, 3), "b": (7,)}
    v, G, c = ({k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shape.items()} for _ in range(3))
    c = {k: t.abs() for k, t in c.items()}
    mask = {k: torch.rand(s, generator=g) < 0.4 for k, s in shape.items()}
    eta = 0.05
    flat = lambda d: torch.cat([d[k].flatten().double() for k in shape])  # noqa: E731
    m, vv, gg, cc = flat(mask), flat(v), flat(G), flat(c)
    expect = eta * float(vv @ (m * gg)) - 0.5 * eta**2 * float((m * cc * gg * gg).sum())
    assert surrogate_improvement(v, c, G, mask, eta) == pytest.approx(expect, rel=1e-12)
    assert surrogate_improvement(v, None, G, mask, eta) == pytest.approx(eta * float(vv @ (m * gg)), rel=1e-12)
    assert surrogate_improvement(v, c, G, {"w": mask["w"]}, eta) != pytest.approx(expect)  # absent = unselected


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def test_first_order_predicts_one_step_sgd_drop(tokenizer):
    """φ_data[n] (u = ηv) vs the MEASURED drop of L_val after θ ← θ − η g_n: Spearman ≥ 0.99 at small η."""
    model = MODELS["llama"](tied=True, dtype=torch.float64)
    params = trainable_params(model)
    pool, target = toy_batches(tokenizer, 16, 4, seed=0), toy_batches(tokenizer, 6, 6, seed=3)
    eta = 1e-3

    def l_val() -> float:
        with torch.no_grad():
            return float(per_example_loss(model, {k: v for k, v in target[0].items() if k != "index"}).mean())

    v_new = target_gradient(model, target, params, acc_dtype=torch.float64)
    u, _, _ = combine_u(v_new, None, None, None, eta, 1.0, 0.0, 1)
    predicted, _ = row_scores(model, pool, u, method="ghost")
    base, drops = l_val(), []
    for b in pool:
        for i in range(b["input_ids"].shape[0]):
            keep = b["attention_mask"][i].bool()
            one = {k: v[i : i + 1, keep] for k, v in b.items() if k != "index"}
            grads = torch.autograd.grad(per_example_loss(model, one)[0], list(params.values()))
            with torch.no_grad():
                for p, g in zip(params.values(), grads):
                    p.sub_(eta * g)
                drops.append(base - l_val())
                for p, g in zip(params.values(), grads):
                    p.add_(eta * g)
    drops_t = torch.tensor(drops, dtype=torch.float64)
    assert _spearman(predicted, drops_t) >= 0.99
    assert torch.allclose(predicted, drops_t, rtol=0.05, atol=1e-3 * float(drops_t.abs().max()))
