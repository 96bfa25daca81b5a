"""Bootstrap intervals over seeds × examples, paired differences and win/tie/loss judgements."""

from __future__ import annotations

import math

import pytest
import torch

from dualsft.errors import ConfigError
from dualsft.evaluation.stats import bootstrap_means, bootstrap_means_reference, judge, mean_ci, paired_difference, tally


def bernoulli(S: int, Q: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(S, Q, generator=g, dtype=torch.float64) < p).double()


def test_fast_bootstrap_equals_the_indexing_oracle():
    x = torch.randn(3, 17, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fast, slow = bootstrap_means(x, 300, seed=5), bootstrap_means_reference(x, 300, seed=5)
    assert torch.allclose(fast, slow, rtol=0, atol=1e-12)


def test_constant_difference_gives_a_zero_width_interval():
    a = bernoulli(3, 64, 0.4, 1)
    d = paired_difference(a + 0.25, a)
    assert d.mean == pytest.approx(0.25) and d.low == d.mean == d.high
    assert judge(d) == "win" and judge(paired_difference(a, a + 0.25)) == "loss"
    same = paired_difference(a, a)
    assert (same.low, same.high) == (0.0, 0.0) and judge(same) == "tie"


def test_symmetric_difference_is_a_tie():
    d = torch.tensor([[1.0, -1.0] * 50, [-1.0, 1.0] * 50], dtype=torch.float64)  # mean 0, symmetric
    iv = paired_difference(d, torch.zeros_like(d))
    assert iv.mean == 0.0 and iv.low < 0.0 < iv.high and judge(iv) == "tie"


def test_deterministic_and_seeded():
    x = bernoulli(3, 100, 0.3, 2)
    assert mean_ci(x, seed=7) == mean_ci(x, seed=7)
    assert mean_ci(x, seed=7) != mean_ci(x, seed=8)
    assert mean_ci(x.tolist(), seed=7) == mean_ci(x, seed=7)  # nested lists work too


def test_one_seed_width_matches_the_binomial_standard_error():
    iv = mean_ci(bernoulli(1, 400, 0.5, 3), n_boot=4000)
    se = math.sqrt(iv.mean * (1 - iv.mean) / 400)
    assert iv.high - iv.low == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert iv.low < iv.mean < iv.high and iv.level == 0.95 and (iv.n_seeds, iv.n_examples) == (1, 400)


def test_items_shared_by_seeds_are_not_counted_as_independent():
    """Crossed resampling: identical rows (all variance from the items) keep the one-seed width, where
    resampling examples independently inside each seed would shrink it by sqrt(S)."""
    item = bernoulli(1, 300, 0.5, 4)
    one, four = mean_ci(item), mean_ci(item.repeat(4, 1))
    assert (four.high - four.low) == pytest.approx(one.high - one.low, rel=0.15)


def test_seed_variance_widens_the_interval():
    x = bernoulli(1, 200, 0.5, 5).repeat(4, 1) + torch.tensor([[-0.2], [0.2], [-0.2], [0.2]], dtype=torch.float64)
    no_seed_effect = mean_ci(bernoulli(1, 200, 0.5, 5).repeat(4, 1))
    assert mean_ci(x).high - mean_ci(x).low > 1.5 * (no_seed_effect.high - no_seed_effect.low)


def test_pairing_removes_what_the_methods_share():
    """B is A minus 0.05 plus small noise on strongly varying items: each CI alone overlaps the other,
    the paired CI of A − B lies above 0."""
    g = torch.Generator().manual_seed(6)
    a = torch.randn(3, 128, generator=g, dtype=torch.float64)
    b = a - 0.05 + 0.02 * torch.randn(3, 128, generator=g, dtype=torch.float64)
    ia, ib = mean_ci(a), mean_ci(b)
    assert ia.low < ib.high
    assert judge(paired_difference(a, b)) == "win"


def test_errors_and_tally():
    with pytest.raises(ConfigError, match="same"):
        paired_difference(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ConfigError, match="shape"):
        mean_ci(torch.zeros(5))
    with pytest.raises(ConfigError, match="NaN"):
        mean_ci(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ConfigError, match="level"):
        mean_ci(torch.zeros(1, 2), level=95)
    assert tally(["win", "tie", "win"]) == {"win": 2, "tie": 1, "loss": 0}
    with pytest.raises(ConfigError, match="verdicts"):
        tally(["draw"])
