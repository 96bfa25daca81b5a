"""LESS-style scores: batched featurisation == per-example oracle; masks restrict what is scored."""

from __future__ import annotations

import pytest
import torch

from dualsft.baselines.less import LessConfig, cosine_scores, less_scores, make_transform, precondition
from dualsft.baselines.pergrad import linear_layers, per_example_grads_loop
from dualsft.baselines.sketch import SignFoldSketch
from dualsft.errors import ConfigError
from dualsft.testing import micro_gpt2, micro_llama


def _oracle_feats(model, batches, sketch, transform):
    names = [n for ly in linear_layers(model) for n in (ly.weight, ly.bias) if n]
    feats = []
    for b in batches:
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "labels")}
        grads = per_example_grads_loop(model, inputs, names)
        feats.append(sketch.project({n: transform(n, g).reshape(g.shape[0], -1) for n, g in grads.items()}))
    return torch.cat(feats)


def _some_mask(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in model.named_parameters():
        if "mlp" in n or "q_proj" in n or "c_attn" in n or "embed" in n:
            out[n] = torch.nonzero(torch.rand(p.numel(), generator=g) < 0.2).flatten()
    return out


@pytest.mark.parametrize("build,use_mask", [(micro_llama, False), (micro_llama, True), (micro_gpt2, True)])
def test_less_scores_equal_per_example_oracle(make_batches, fake_curvature, build, use_mask):
    model = build(seed=5, dtype=torch.float64)
    pool, target = make_batches(8, seed=1), make_batches(4, seed=2, offset=100)
    c = fake_curvature(model)
    mask = _some_mask(model) if use_mask else None
    cfg = LessConfig(dim=256)
    scores, idx = less_scores(model, pool, target, cfg, seed=7, curvature=c, mask=mask)
    assert idx == [int(i) for b in pool for i in b["index"]]

    from dualsft.selection.mask import indices_to_dense
    params = dict(model.named_parameters())
    dense = {n: indices_to_dense(i, params[n].shape) for n, i in mask.items()} if mask else None
    sk = SignFoldSketch(256, seed=7)
    t = _oracle_feats(model, target, sk, make_transform(cfg, c, None, dense, torch.float64, use_precondition=False))
    f = _oracle_feats(model, pool, sk, make_transform(cfg, c, None, dense, torch.float64, use_precondition=True))
    # per-example gradients agree to ~1e-16 of their largest entry; the Adam direction divides by
    # sqrt(β2 c + ε) with c down to 1e-8, which lifts small entries (and their rounding) towards the
    # largest ones, and a cosine of 8 such sums cancels: measured 5e-10 relative, hence 1e-8.
    torch.testing.assert_close(scores, cosine_scores(f, t), rtol=1e-8, atol=1e-10)
    assert scores.abs().max() <= 1.0 + 1e-12 and scores.std() > 0


def test_mask_only_masked_entries_matter():
    """sift→less: perturbing gradient entries OUTSIDE the mask leaves the features unchanged; inside, not."""
    g = torch.Generator().manual_seed(0)
    shapes = {"l1.weight": (16, 8), "l1.bias": (16,), "l2.weight": (8, 16)}
    grads = {n: torch.randn((3, *s), generator=g, dtype=torch.float64) for n, s in shapes.items()}
    curv = {n: torch.rand(s, generator=g, dtype=torch.float64) * 1e-4 for n, s in shapes.items()}
    m = {n: torch.rand(s, generator=g) < 0.3 for n, s in shapes.items() if n != "l1.bias"}  # l1.bias unmasked
    tr = make_transform(LessConfig(dim=64), curv, None, m, torch.float64, use_precondition=True)
    sk = SignFoldSketch(64, seed=1)

    def feats(gr):
        return sk.project({n: tr(n, x).reshape(3, -1) for n, x in gr.items()})

    base = feats(grads)
    outside = {n: x + (0 if n not in m else 5.0 * (~m[n]).to(x)) for n, x in grads.items()}
    outside["l1.bias"] = grads["l1.bias"] * 7.0
    assert torch.equal(feats(outside), base)
    inside = {n: x + (m[n].to(x) if n in m else 0) for n, x in grads.items()}
    assert not torch.allclose(feats(inside), base)


def test_precondition_formulas():
    g = torch.tensor([[0.5, -2.0, 0.0]], dtype=torch.float64)
    c = torch.tensor([1e-4, 4.0, 1.0], dtype=torch.float64)
    cfg = LessConfig()
    want = 0.1 * g / torch.sqrt(0.999 * c + 0.001 * g * g + 1e-8)
    torch.testing.assert_close(precondition(g, c, None, cfg), want)
    m = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    torch.testing.assert_close(precondition(g, c, m, cfg), (0.9 * m + 0.1 * g) / torch.sqrt(0.999 * c + 0.001 * g * g + 1e-8))
    rs = LessConfig(precondition="rsqrt")
    torch.testing.assert_close(precondition(g, c, None, rs), g / (c.sqrt() + 1e-8))


def test_less_needs_curvature(make_batches):
    with pytest.raises(ConfigError, match="exp_avg_sq"):
        less_scores(micro_llama(), make_batches(4, 1), make_batches(2, 2), LessConfig(dim=32), seed=0)
