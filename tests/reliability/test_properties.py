"""Property tests (issue 8, part 4) that the package's own tests did not have yet.

Already covered elsewhere (not repeated): labels never cover prompt tokens and tokenisation keeps the
example index (tests/data/test_formats.py), the fast top-k equals its oracle (tests/selection/test_topk.py).
Added here: the WHOLE mask policy (quotas, filters, units) keeps the budget exact and the indices within
the shapes for random shapes and budgets; the data subset is exactly top-b; example indices are stable
through files with blank lines and through a written-and-reread subset.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualsft.data.formats import load_examples
from dualsft.selection.mask import load_mask, save_mask
from dualsft.selection.policy import MaskSpec, select_mask, select_subset
from dualsft.selection.topk import resolve_budget

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


@st.composite
def scored_params(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """φ_param for a random little model: 1-3 layers of random modules with random 1-D/2-D shapes, plus an
    embedding; scores with heavy ties or continuous."""
    names = ["model.embed_tokens.weight"]
    for layer in range(draw(st.integers(1, 3))):
        mods = draw(st.lists(st.sampled_from(MODULES), min_size=1, max_size=3, unique=True))
        names += [f"model.layers.{layer}.{m}.weight" for m in mods]
        if draw(st.booleans()):
            names.append(f"model.layers.{layer}.input_layernorm.weight")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ties = draw(st.booleans())
    out = {}
    for n in names:
        shape = (draw(st.integers(1, 7)),) if "norm" in n else (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
        out[n] = torch.randint(-2, 3, shape, generator=g).float() if ties else torch.randn(shape, generator=g)
    return out


def budget_for(draw: st.DrawFn, d: int) -> float:
    """A fraction in (0, 1] whose count is >= 1, or a whole count in [2, d] (counts of 1 read as 100%)."""
    if d >= 2 and draw(st.booleans()):
        return float(draw(st.integers(2, d)))
    return draw(st.floats(min_value=1.0 / d, max_value=1.0))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_element_mask_budget_exact_and_indices_within_shapes(data: st.DataObject, tmp_path_factory) -> None:
    scores = data.draw(scored_params())
    d = sum(t.numel() for t in scores.values())
    ql = data.draw(st.sampled_from([0.0, 0.1, 0.2, 0.5]))
    qm = data.draw(st.sampled_from([0.0, 0.2, 0.5]))
    spec = MaskSpec(budget=budget_for(data.draw, d), sign=data.draw(st.sampled_from(["signed", "abs"])),
                    quota_layer=ql, quota_module=qm)
    k = resolve_budget(spec.budget, d, "--param-budget", "entries")
    before = {n: t.clone() for n, t in scores.items()}
    m = select_mask(scores, spec)
    assert m.k == k and m.n_selected == k and m.d == d  # exact, quotas and all
    assert m.shapes == {n: tuple(t.shape) for n, t in scores.items()}
    for n, idx in m.indices.items():
        assert idx.dtype == torch.int32 and idx.numel() > 0
        assert int(idx.min()) >= 0 and int(idx.max()) < scores[n].numel()
        assert bool((idx[1:] > idx[:-1]).all())  # sorted, no duplicates
    assert all(torch.equal(scores[n], before[n]) for n in scores)  # the caller's scores are untouched
    # the saved format round-trips
    path = Path(tmp_path_factory.mktemp("mask")) / "mask.safetensors"
    save_mask(path, m.indices, m.shapes)
    idx, shapes = load_mask(path)
    assert shapes == m.shapes and all(torch.equal(idx[n], m.indices[n].long()) for n in m.indices)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_structured_mask_within_budget_and_shapes(data: st.DataObject) -> None:
    scores = data.draw(scored_params())
    d = sum(t.numel() for t in scores.values())
    r, c = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    gran = data.draw(st.sampled_from(["row", "column", f"block:{r}x{c}"]))
    spec = MaskSpec(budget=budget_for(data.draw, d), quota_layer=data.draw(st.sampled_from([0.0, 0.2])),
                    quota_module=data.draw(st.sampled_from([0.0, 0.2])), granularity=gran)
    m = select_mask(scores, spec)
    assert m.n_selected <= m.k
    for n, idx in m.indices.items():
        assert int(idx.min()) >= 0 and int(idx.max()) < scores[n].numel()
        assert bool((idx[1:] > idx[:-1]).all())
        # units are chosen whole: a selected row (column) is selected entirely
        t = scores[n]
        dense = torch.zeros(t.numel(), dtype=torch.bool)
        dense[idx.long()] = True
        dense = dense.view(t.shape if t.dim() == 2 else (1, t.numel()))
        if gran == "row":
            assert bool((dense.all(1) | ~dense.any(1)).all())
        elif gran == "column":
            assert bool((dense.all(0) | ~dense.any(0)).all())


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 10_000), ties=st.booleans(), data=st.data())
def test_subset_is_exactly_top_b(n: int, seed: int, ties: bool, data: st.DataObject) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (n,), generator=g).double() if ties else torch.randn(n, generator=g).double()
    budget = budget_for(data.draw, n)
    b = resolve_budget(budget, n, "--data-budget", "examples")
    sub = select_subset(scores, budget)
    pos = sub.positions.tolist()
    assert sub.b == b and len(pos) == b and pos == sorted(set(pos)) and all(0 <= p < n for p in pos)
    rest = sorted(set(range(n)) - set(pos))
    if rest:
        assert float(scores[pos].min()) >= float(scores[rest].max())
        # ties at the threshold go to the earlier position
        tau = float(scores[pos].min())
        assert all(p < q for p in pos for q in rest if scores[p] == tau and scores[q] == tau)


@settings(max_examples=200, deadline=None)
@given(value=st.floats(min_value=1e-6, max_value=1.0), total=st.integers(1, 10**7))
def test_fraction_budget_is_round_half_up_and_in_range(value: float, total: int) -> None:
    exact = value * total
    if exact < 0.5 - 1e-9:
        return  # rounds to 0: refused (tested in test_bad_inputs)
    k = resolve_budget(value, total, "--b", "things")
    assert 1 <= k <= total and k == math.floor(exact + 0.5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=12),
       blanks=st.lists(st.booleans(), min_size=12, max_size=12), data=st.data())
def test_indices_stable_through_blank_lines_and_rereading(texts: list[str], blanks: list[bool],
                                                          data: st.DataObject, tmp_path: Path) -> None:
    """Index = position among non-blank lines; a subset written with its "index" field (as `dualsft select`
    writes subset.jsonl) reads back with the same indices, in any order."""
    recs = [{"instruction": t, "response": t[::-1]} for t in texts]
    lines = []
    for r, blank in zip(recs, blanks):
        lines.append(json.dumps(r))
        if blank:
            lines.append("   ")
    f = tmp_path / "pool.jsonl"
    f.write_text("\n".join(lines) + "\n")
    ex = load_examples(f)
    assert [e.index for e in ex] == list(range(len(recs)))
    assert [e.record for e in ex] == recs
    chosen = data.draw(st.lists(st.sampled_from(range(len(recs))), min_size=1, unique=True))
    sub = tmp_path / "subset.jsonl"
    sub.write_text("".join(json.dumps({**recs[i], "index": i, "score": 0.5}) + "\n" for i in chosen))
    again = load_examples(sub)
    assert [e.index for e in again] == chosen
    assert [e.response for e in again] == [recs[i]["response"] for i in chosen]
