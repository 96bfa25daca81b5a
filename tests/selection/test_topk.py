"""Budgets and the scalable top-k: it equals the concatenate-and-sort oracle, ties included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualsft.errors import BudgetError
from dualsft.selection.topk import NEG_INF, resolve_budget, take_top_, take_top_reference_


@pytest.mark.parametrize("value, total, k", [(0.1, 1000, 100), (1.0, 7, 7), (0.5, 3, 2), (0.15, 10, 2),
                                             (5, 10, 5), (10, 10, 10), (2.0, 10, 2)])
def test_resolve_budget(value, total, k):
    assert resolve_budget(value, total, "--b", "things") == k


@pytest.mark.parametrize("value, match", [(0, "fraction"), (-0.1, "fraction"), (float("nan"), "fraction"),
                                          (0.001, "rounds to 0"), (11, "exceeds"), (2.5, "whole number")])
def test_resolve_budget_errors(value, match):
    with pytest.raises(BudgetError, match=match):
        resolve_budget(value, 10, "--b", "things")


@st.composite
def problems(draw):
    """A few small tensors with heavy ties, some unavailable (-inf) entries, optional unit sizes."""
    n_t = draw(st.integers(1, 4))
    shapes = [draw(st.sampled_from([(1,), (5,), (3, 4), (7, 2)])) for _ in range(n_t)]
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    ties = draw(st.booleans())
    work = []
    for s in shapes:
        t = torch.randint(-3, 4, s, generator=g).float() if ties else torch.randn(s, generator=g)
        t[torch.rand(s, generator=g) < 0.15] = NEG_INF
        work.append(t)
    sizes = [torch.randint(1, 6, s, generator=g) for s in shapes] if draw(st.booleans()) else None
    total = sum(int(s.sum()) for s in sizes) if sizes else sum(t.numel() for t in work)
    k = draw(st.integers(0, total + 3))
    sample = draw(st.sampled_from([2, 5, 1 << 18]))  # tiny samples force bracket misses and retries
    return work, sizes, k, sample


@settings(max_examples=300, deadline=None)
@given(problems())
def test_fast_top_k_equals_oracle(problem):
    work, sizes, k, sample = problem
    fast, ref = [t.clone() for t in work], [t.clone() for t in work]
    a = take_top_(fast, k, sizes, sample_size=sample)
    b = take_top_reference_(ref, k, sizes)
    assert [torch.equal(torch.isneginf(x), torch.isneginf(y)) for x, y in zip(fast, ref)] == [True] * len(work)
    assert (a.taken, a.threshold) == (b.taken, b.threshold)


def test_exact_budget_and_tie_order():
    """All scores equal: the first k in (tensor order, flat index) order are taken, exactly k."""
    work = [torch.zeros(5), torch.zeros(2, 3)]
    res = take_top_(work, 7)
    assert res.taken == [5, 2] and res.threshold == 0.0
    assert torch.isneginf(work[1]).flatten().tolist() == [True, True, False, False, False, False]


def test_large_sampled_problem_matches_oracle():
    g = torch.Generator().manual_seed(1)
    work = [torch.randn(300_000, generator=g), torch.randn(500, 300, generator=g).round(decimals=1)]
    for k in (1, 12_345, 200_000, 449_999):
        fast, ref = [t.clone() for t in work], [t.clone() for t in work]
        assert take_top_(fast, k).taken == take_top_reference_(ref, k).taken
        assert all(torch.equal(x, y) for x, y in zip(fast, ref))
        assert sum(int(torch.isneginf(t).sum()) for t in fast) == k
