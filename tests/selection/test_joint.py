"""Joint refinement with the real scoring engine: the parameter step never lowers I(m, S)."""

from __future__ import annotations

import pytest
import torch

from dualsft.data.formats import batches, load_examples, tokenize_examples
from dualsft.method import subset_term, surrogate_improvement
from dualsft.models import load_model, load_tokenizer
from dualsft.scoring.rows import row_scores
from dualsft.scoring.stats import gradient_sum, trainable_params
from dualsft.selection.joint import dense_masks, refine_jointly
from dualsft.selection.policy import MaskSpec, select_mask, select_subset


def test_mask_term_sums_to_the_surrogate():
    """Σ_j m_j t_j(S) = I(m, S) for any mask: the identity behind the monotonicity."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (5, 7), "b": (11,)}
    v, c, G = ({n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()} for _ in range(3))
    c = {n: t.abs() for n, t in c.items()}
    m = {n: torch.rand(s, generator=g) < 0.4 for n, s in shapes.items()}
    t = subset_term(v, c, G, eta=0.3)
    assert sum(float(t[n][m[n]].sum()) for n in shapes) == pytest.approx(surrogate_improvement(v, c, G, m, 0.3), rel=1e-12)


def engine(scored_run):
    """The callables refine_jointly needs, built on the real scoring API over the run's pool."""
    model = load_model(str(scored_run.model_dir), dtype="float32", device="cpu")
    tok = load_tokenizer(str(scored_run.model_dir))
    toks = tokenize_examples(load_examples(scored_run.pool), tok, "chat", 64)
    params = trainable_params(model)

    def grad_sum(pos):
        return gradient_sum(model, batches([toks[i] for i in pos.tolist()], 8, tok.pad_token_id), params)

    def rows(u):
        return row_scores(model, batches(toks, 8, tok.pad_token_id), u)[0]

    return grad_sum, rows


@pytest.mark.parametrize("order", [2, 1])
def test_parameter_step_never_lowers_the_surrogate(scored_run, order):
    grad_sum, rows = engine(scored_run)
    v, eta = scored_run.v, scored_run.eta
    c = scored_run.c if order == 2 else None
    spec = MaskSpec(budget=0.03, quota_layer=0.0, quota_module=0.0)
    mask0 = select_mask(scored_run.phi_param, spec)
    sub0 = select_subset(scored_run.phi_data, 6.0)

    def surrogate(v_, G_S, m):
        return surrogate_improvement(v_, c, G_S, m, eta)

    res = refine_jointly(v, c, eta, spec, mask0, sub0.positions, scored_run.phi_data[sub0.positions], sub0.b, 3,
                         grad_sum, rows, surrogate)
    hist = res.history
    assert res.monotone_guaranteed and len(hist) >= 3
    for prev, cur in zip(hist, hist[1:]):
        if cur["step"] == "param":
            assert cur["I"] >= prev["I"] - 1e-9 * abs(prev["I"])
    assert res.passes["row_score_examples"] == 24 * sum(h["step"] == "data" for h in hist)
    # the written pair is the best visited, and its recorded I is what the surrogate gives it
    G_best = grad_sum(res.positions)
    I_best = surrogate(v, G_best, dense_masks(res.mask.indices, res.mask.shapes))
    assert I_best == pytest.approx(max(h["I"] for h in hist), rel=1e-6)
    assert res.mask.n_selected == mask0.k and len(res.positions) == 6
    # for that subset, no random mask of the same size beats the parameter step
    best_for_S = select_mask(subset_term(v, c, G_best, eta), spec, k=mask0.k)
    I_opt = surrogate(v, G_best, dense_masks(best_for_S.indices, best_for_S.shapes))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        rnd = {n: torch.rand(t.shape, generator=g) for n, t in v.items()}
        m = select_mask(rnd, spec, k=mask0.k)
        assert surrogate(v, G_best, dense_masks(m.indices, m.shapes)) <= I_opt + 1e-12


def test_quotas_void_the_guarantee_flag(scored_run):
    grad_sum, rows = engine(scored_run)
    spec = MaskSpec(budget=0.03)
    mask0 = select_mask(scored_run.phi_param, spec)
    sub0 = select_subset(scored_run.phi_data, 4.0)
    res = refine_jointly(scored_run.v, scored_run.c, scored_run.eta, spec, mask0, sub0.positions,
                         scored_run.phi_data[sub0.positions], sub0.b, 1, grad_sum, rows,
                         lambda v, G, m: surrogate_improvement(v, scored_run.c, G, m, scored_run.eta))
    assert not res.monotone_guaranteed and res.history[0]["step"] == "start"
