"""The sign-fold CountSketch: approximately preserves inner products, exactly reproducible, linear."""

from __future__ import annotations

import math

import torch

from dualsft.baselines.sketch import SignFoldSketch, next_prime

SHAPES = {"a.weight": (96, 64), "b.weight": (64, 96), "b.bias": (64,), "c.weight": (200, 64)}


def _vectors(seed: int, structured: bool = False) -> dict[str, torch.Tensor]:
    """Random per-tensor values [2, D] (two vectors); ``structured`` puts most energy in one input column
    of every weight (an 'outlier hidden dimension' shared across layers, the worst case for a fold)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, shape in SHAPES.items():
        x = torch.randn((2, *shape), generator=g, dtype=torch.float64)
        if structured and len(shape) == 2:
            x[..., 7] *= 30.0
        out[n] = x.reshape(2, -1)
    return out


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()))


def test_inner_products_preserved_within_countsketch_variance():
    """Over many random pairs (correlated, cos ≈ 0.45), the cosine error of the projection has the RMS a
    CountSketch should have, sqrt((1 + cos²)/k) (≈ 0.024 at k = 2048), checked to within 1.5x, and no single
    pair is off by more than 5 RMS; norms are preserved to the same relative accuracy."""
    k = 2048
    for structured in (False, True):
        errs, norm_errs, c0 = [], [], []
        for seed in range(30):
            xs = _vectors(seed, structured)
            noise = _vectors(seed + 1000, structured)
            pair = {n: torch.stack([v[0], v[0] + 1.8 * noise[n][1]]) for n, v in xs.items()}  # correlated pair
            full = torch.cat(list(pair.values()), dim=1)  # [2, D]
            y = SignFoldSketch(k, seed=seed).project(pair)  # [2, k]
            c = _cos(full[0], full[1])
            c0.append(c)
            errs.append(_cos(y[0], y[1]) - c)
            norm_errs.append(float(y[0].norm() ** 2 / full[0].norm() ** 2 - 1))
        rms = math.sqrt(sum(e * e for e in errs) / len(errs))
        theory = math.sqrt((1 + (sum(c0) / len(c0)) ** 2) / k)
        assert rms < 1.5 * theory, (structured, rms, theory)
        assert max(abs(e) for e in errs) < 5 * theory
        assert math.sqrt(sum(e * e for e in norm_errs) / len(norm_errs)) < 1.5 * math.sqrt(2 / k)


def test_unbiased_on_average():
    xs = _vectors(0)
    full = torch.cat(list(xs.values()), dim=1)
    exact = float(full[0] @ full[1])
    est = [float((lambda y: y[0] @ y[1])(SignFoldSketch(256, seed=s).project(xs))) for s in range(200)]
    mean = sum(est) / len(est)
    spread = (sum((e - mean) ** 2 for e in est) / len(est)) ** 0.5
    assert abs(mean - exact) < 4 * spread / math.sqrt(len(est))


def test_deterministic_linear_and_batch_independent():
    xs = _vectors(1)
    a = SignFoldSketch(512, seed=3).project(xs)
    b = SignFoldSketch(512, seed=3).project(xs)
    assert torch.equal(a, b)
    assert not torch.equal(a, SignFoldSketch(512, seed=4).project(xs))
    one = SignFoldSketch(512, seed=3).project({n: v[1:] for n, v in xs.items()})
    torch.testing.assert_close(one[0], a[1])  # a row's projection does not depend on its batch
    two = SignFoldSketch(512, seed=3).project({n: 2 * v for n, v in xs.items()})
    torch.testing.assert_close(two, 2 * a)


def test_next_prime():
    assert [next_prime(n) for n in (1, 2, 8, 14, 65536)] == [2, 2, 11, 17, 65537]
