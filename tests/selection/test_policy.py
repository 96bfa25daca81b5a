"""Mask and subset policies: exact budgets, quota shares, structured units, filters, ties, errors."""

from __future__ import annotations

import pytest
import torch

from dualsft.errors import BudgetError, ConfigError, SelectionError
from dualsft.selection.mask import indices_to_dense
from dualsft.selection.names import locate
from dualsft.selection.policy import MaskSpec, quota_entries, select_mask, select_subset
from dualsft.selection.topk import take_top_reference_
from dualsft.selection.units import matrix_shape
from dualsft.testing import micro_gpt2, micro_llama

NO_QUOTA = dict(quota_layer=0.0, quota_module=0.0)


def fake_scores(model_fn=micro_llama, seed: int = 0, ties: bool = False) -> dict[str, torch.Tensor]:
    """φ_param shaped like a micro model's trainable parameters (tied weights once)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in model_fn().named_parameters():
        t = torch.randn(p.shape, generator=g)
        out[n] = t.round(decimals=0) if ties else t
    return out


def dense(sel) -> dict[str, torch.Tensor]:
    return {n: indices_to_dense(sel.indices[n], s) if n in sel.indices else torch.zeros(s, dtype=torch.bool)
            for n, s in sel.shapes.items()}


def plain_top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Concatenate every entry in name order, stable-sort descending, keep the first k."""
    names = sorted(scores)
    flat = torch.cat([scores[n].flatten() for n in names])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    out, o = {}, 0
    for n in names:
        out[n] = keep[o : o + scores[n].numel()].view(scores[n].shape)
        o += scores[n].numel()
    return out


@pytest.mark.parametrize("model_fn", [micro_llama, micro_gpt2])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("budget", [0.1, 0.37, 1234, 1.0])
def test_no_quota_mask_is_plain_global_top_k(model_fn, ties, budget):
    scores = fake_scores(model_fn, ties=ties)
    sel = select_mask(scores, MaskSpec(budget=budget, **NO_QUOTA))
    want = plain_top_k(scores, sel.k)
    assert sel.n_selected == sel.k
    assert all(torch.equal(dense(sel)[n], want[n]) for n in scores)


def test_abs_ranks_by_magnitude():
    scores = fake_scores()
    sel = select_mask(scores, MaskSpec(budget=0.2, sign="abs", **NO_QUOTA))
    want = plain_top_k({n: t.abs() for n, t in scores.items()}, sel.k)
    assert all(torch.equal(dense(sel)[n], want[n]) for n in scores)


def test_ties_are_deterministic_name_then_index():
    scores = {n: torch.zeros_like(t) for n, t in fake_scores().items()}
    sel = select_mask(scores, MaskSpec(budget=100, **NO_QUOTA))
    first = sorted(scores)[0]
    assert list(sel.indices) == [first] and sel.indices[first].tolist() == list(range(100))
    assert torch.equal(select_mask(scores, MaskSpec(budget=100, **NO_QUOTA)).indices[first], sel.indices[first])


@pytest.mark.parametrize("ql, qm", [(0.2, 0.2), (0.5, 0.0), (0.0, 0.6), (0.5, 0.5)])
def test_quota_shares_and_exact_total(ql, qm):
    scores = fake_scores(ties=True)
    sel = select_mask(scores, MaskSpec(budget=0.1, quota_layer=ql, quota_module=qm))
    k = sel.k
    assert sel.n_selected == k
    per_layer, per_group = {}, {}
    for n, idx in sel.indices.items():
        loc = locate(n)
        per_layer[loc.layer] = per_layer.get(loc.layer, 0) + idx.numel()
        per_group[loc.group] = per_group.get(loc.group, 0) + idx.numel()
    layer_share = quota_entries(ql, k) // 2
    group_share = quota_entries(qm, k) // len({locate(n).group for n in scores})
    stages = {(s["stage"], s.get("layer", s.get("group"))): s for s in sel.stages}
    for L in (0, 1):
        assert per_layer.get(L, 0) >= layer_share
        if ql:
            assert stages[("layer", L)]["taken"] == layer_share
    for g in {locate(n).group for n in scores}:
        assert per_group.get(g, 0) >= min(group_share, sum(t.numel() for n, t in scores.items() if locate(n).group == g))
    assert sum(s["taken"] for s in sel.stages) == k


def test_quota_stages_equal_sequential_oracle():
    """Each stage is the top of what earlier stages left: replay the stages with the oracle."""
    scores = fake_scores(ties=True)
    spec = MaskSpec(budget=0.15)
    sel = select_mask(scores, spec)
    names = sorted(scores)
    work = [scores[n].clone().view(-1) for n in names]
    for s in sel.stages:
        if s["stage"] == "layer":
            members = [i for i, n in enumerate(names) if locate(n).layer == s["layer"]]
        elif s["stage"] == "module":
            members = [i for i, n in enumerate(names) if locate(n).group == s["group"]]
        else:
            members = list(range(len(names)))
        res = take_top_reference_([work[i] for i in members], s["target"])
        assert res.total == s["taken"] and res.threshold == s["threshold"]
    got = dense(sel)
    assert all(torch.equal(torch.isneginf(w).view(scores[n].shape), got[n]) for n, w in zip(names, work))


def unit_reference(scores: dict[str, torch.Tensor], k: int, r_c) -> dict[str, set]:
    """Units ranked by (sum desc, name, unit index) with Python's stable sort; prefix that fits k."""
    units = []
    for n in sorted(scores):
        R, C = matrix_shape(scores[n].shape)
        r, c = r_c(R, C)
        x = scores[n].reshape(R, C).double()
        ui = 0
        for i in range(0, R, r):
            for j in range(0, C, c):
                blk = x[i : i + r, j : j + c]
                units.append((-float(blk.sum()), n, ui, blk.numel(), (i, j, r, c, C)))
                ui += 1
    units.sort(key=lambda u: (u[0], u[1], u[2]))
    chosen, used = {}, 0
    for _neg, n, _ui, size, (i, j, r, c, C) in units:
        if used + size > k:
            break
        used += size
        R = matrix_shape(scores[n].shape)[0]
        chosen.setdefault(n, set()).update(a * C + b for a in range(i, min(i + r, R)) for b in range(j, min(j + c, C)))
    return chosen


@pytest.mark.parametrize("gran, r_c", [
    ("row", lambda R, C: (1, C)),
    ("column", lambda R, C: (R, 1)),
    ("block:4x8", lambda R, C: (min(4, R), min(8, C))),
    ("block:3x5", lambda R, C: (min(3, R), min(5, C))),
])
def test_structured_units_chosen_whole_and_budget_rule(gran, r_c):
    scores = fake_scores(micro_gpt2)
    sel = select_mask(scores, MaskSpec(budget=0.1, granularity=gran, **NO_QUOTA))
    want = unit_reference(scores, sel.k, r_c)
    assert {n: set(v.tolist()) for n, v in sel.indices.items()} == want
    assert sel.n_selected <= sel.k
    largest = max(r * c for R, C in (matrix_shape(s) for s in sel.shapes.values()) for r, c in [r_c(R, C)])
    assert sel.k - sel.n_selected < largest


def test_structured_with_quotas_stays_within_budget():
    scores = fake_scores()
    sel = select_mask(scores, MaskSpec(budget=0.2, granularity="row"))
    assert sel.k - 64 < sel.n_selected <= sel.k  # rows of the micro model hold at most 64 entries
    for n, idx in sel.indices.items():  # every chosen row is whole
        R, C = matrix_shape(sel.shapes[n])
        rows = torch.bincount(idx.long() // C, minlength=R)
        assert set(rows.tolist()) <= {0, C}


def test_include_exclude():
    scores = fake_scores()
    sel = select_mask(scores, MaskSpec(budget=0.05, exclude="embed"))
    assert not any("embed" in n for n in sel.indices) and sel.n_selected == sel.k
    sel = select_mask(scores, MaskSpec(budget=0.05, include=r"mlp\.", exclude="down"))
    assert sel.indices and all("mlp." in n and "down" not in n for n in sel.indices)


@pytest.mark.parametrize("kw, err, match", [
    (dict(budget=0), BudgetError, "fraction"),
    (dict(budget=10**9), BudgetError, "exceeds"),
    (dict(budget=1.5), BudgetError, "whole number"),
    (dict(quota_layer=0.7, quota_module=0.5), BudgetError, "sum to at most 1"),
    (dict(quota_layer=-0.1), BudgetError, "share"),
    (dict(include="no_such_param"), SelectionError, "matches no parameter"),
    (dict(exclude="no_such_param"), SelectionError, "matches no parameter"),
    (dict(include="norm", budget=0.5), BudgetError, "--include/--exclude leave only"),
    (dict(include="("), SelectionError, "not a valid regular expression"),
    (dict(granularity="tiles"), ConfigError, "block:RxC"),
    (dict(sign="both"), SelectionError, "signed or abs"),
])
def test_bad_requests_raise_typed_errors(kw, err, match):
    with pytest.raises(err, match=match):
        select_mask(fake_scores(), MaskSpec(**kw))


def test_non_finite_scores_refused():
    scores = fake_scores()
    scores["model.norm.weight"][3] = float("nan")
    with pytest.raises(SelectionError, match="model.norm.weight"):
        select_mask(scores, MaskSpec())


def test_select_mask_leaves_input_untouched_unless_consumed():
    scores = fake_scores()
    before = {n: t.clone() for n, t in scores.items()}
    select_mask(scores, MaskSpec(sign="abs"))
    assert all(torch.equal(before[n], scores[n]) for n in scores)


def test_subset_top_b_with_ties_and_always_signed():
    s = torch.tensor([0.5, -2.0, 0.5, 1.0, 0.5, -0.1])
    assert select_subset(s, 0.5).positions.tolist() == [0, 2, 3]       # b = 3: 1.0, then first two 0.5s
    assert select_subset(s, 2.0).positions.tolist() == [0, 3]          # -2.0 is large in |φ| but predicts harm
    assert select_subset(s, 1.0).b == 6
    with pytest.raises(BudgetError, match="exceeds"):
        select_subset(s, 7.0)
    with pytest.raises(BudgetError):
        select_subset(s, 0.0)
