"""Budgets and a global top-k over many tensors that never sorts all entries (docs/method.md §5 step 4).

The selectors work IN PLACE on "work" tensors of scores (φ_param entries, or unit scores for structured
masks): a chosen unit is marked by overwriting its score with -inf, and -inf on entry means "not
available" (already chosen by an earlier quota stage, or excluded). Real scores must be finite; callers
check that first. At the end the mask is simply ``isneginf(work)`` minus what was unavailable.

Order and tie-break (the documented contract, shared by the fast path and its oracle): units are ranked
by (score descending, tensor position in the list ascending, flat unit index ascending). Callers pass
tensors in lexicographic parameter-name order, so ties go to the earlier name, then the lower index.

Budget rule (units may have sizes > 1 for structured masks; the budget k counts ENTRIES): walk the
ranking and take units while the running total of their sizes stays <= k; stop at the first unit that
does not fit (no skipping ahead to smaller units). With unit sizes 1 this takes exactly min(k, available).

Fast path (``take_top_``): a seeded random sample of ~2**18 scores brackets the cut-off [lo, hi); one pass
counts the weight >= hi and above lo per tensor and gathers the few scores strictly inside the bracket;
the cut-off τ follows from sorting only those; a last pass marks every unit above τ and the first ties
at τ in tie order. Cost: ~3 elementwise passes over the scores, memory: one bool tensor per tensor at a
time plus the bracket contents (~0.5% of the entries at 2**18 samples). If the sample's bracket misses (it cannot
mislead, only cost a retry) the side that missed widens 4x, inside what the pass proved about τ, ending
at -inf or +inf on that side, which always holds.
``take_top_reference_`` concatenates and stable-sorts everything: the slow, obviously correct oracle.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dualsft.errors import BudgetError

NEG_INF = float("-inf")
SAMPLE_SIZE = 1 << 18
# Fixed, and unlike the seeds users and tests pick (seed 0 drew the same stream as torch.randn(seed 0)
# scores and biased the sample); any seed is correct, this one only has to be deterministic.
SAMPLE_SEED = 0x5E1EC7


@dataclass(frozen=True)
class TakeResult:
    """What one selection stage took.

    threshold: τ, the score of the first unit left out in rank order (None: everything available taken).
    taken: entries (sum of unit sizes) taken per tensor, in the order of the input list.
    """

    threshold: float | None
    taken: list[int]

    @property
    def total(self) -> int:
        return sum(self.taken)


def resolve_budget(value: float, total: int, flag: str, what: str) -> int:
    """A budget as an exact integer count out of ``total``.

    ``value`` in (0, 1] is a fraction: round-half-up of value * total (1 means all of them). A value > 1 is
    an absolute count and must be a whole number <= total. Raises BudgetError saying what to change.
    """
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"{flag} {value!r}: a budget must be a fraction in (0, 1] or a count >= 2 of the "
                          f"{total} {what}")
    if value <= 1:
        k = math.floor(value * total + 0.5)
        if k == 0:
            raise BudgetError(f"{flag} {value!r} of {total} {what} rounds to 0; raise it to at least {1 / total:.3g}")
        return k
    if value != int(value):
        raise BudgetError(f"{flag} {value!r}: above 1 a budget is a count of {what} and must be a whole number")
    if value > total:
        raise BudgetError(f"{flag} {int(value)} exceeds the {total} {what} available; lower it (or pass a "
                          "fraction in (0, 1])")
    return int(value)


def _weight(mask: torch.Tensor, sizes: torch.Tensor | None) -> int:
    """Total size of the units where ``mask`` is True (a count when sizes is None)."""
    if sizes is None:
        return int(torch.count_nonzero(mask))
    return int(sizes[mask].sum())


def _sample(work: list[torch.Tensor], sizes: list[torch.Tensor | None], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Available scores of a seeded random sample (all of them when small), sorted descending, with each
    sampled unit's estimated share of the total weight. Returns (values [S] float64, weights [S] float64)."""
    total = sum(t.numel() for t in work)
    gen = torch.Generator().manual_seed(SAMPLE_SEED)
    vals, wts = [], []
    for t, s in zip(work, sizes):
        if total <= 2 * n:
            idx = torch.arange(t.numel())
        else:
            m = max(1, round(n * t.numel() / total))
            idx = torch.randint(t.numel(), (m,), generator=gen)
        w = torch.ones(len(idx), dtype=torch.float64) if s is None else s.reshape(-1)[idx].double()
        vals.append(t.reshape(-1)[idx])
        wts.append(w * (t.numel() / len(idx)))
    v, w = torch.cat(vals), torch.cat(wts)
    keep = v > NEG_INF
    v, w = v[keep], w[keep]
    order = torch.argsort(v, descending=True)
    return v[order], w[order]


def _bracket(v: torch.Tensor, w: torch.Tensor, k: int, widen: tuple[int, int],
             known: tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) with lo < hi around the sample's estimate of τ (the first unit whose running weight
    exceeds k); hi is strictly above that estimate.

    The margin on each side is 4 binomial standard deviations of that sample position (+16) times
    ``widen`` (hi side, lo side). ``known`` = (floor, ceil) with floor <= τ < ceil learnt from earlier
    passes: the bracket stays inside it, so a retry only searches the side that missed."""
    floor, ceil = known
    over = torch.nonzero(torch.cumsum(w, 0) > k).flatten()
    p = int(over[0]) if len(over) else len(v)
    q = min(max(p, 1), len(v)) / max(len(v), 1)
    base = int(4 * math.sqrt(len(v) * q * (1 - q))) + 16
    hi_i = p - base * widen[0]
    if p < len(v):
        hi_i = min(hi_i, int((v > v[p]).sum()) - 1)
    if floor > NEG_INF:
        hi_i = min(hi_i, int((v > floor).sum()) - 1)
    lo_i = p + base * widen[1]
    if ceil < math.inf:
        lo_i = max(lo_i, int((v >= ceil).sum()))
    hi = min(float(v[hi_i]) if hi_i >= 0 else math.inf, ceil)
    lo = max(float(v[lo_i]) if lo_i < len(v) else NEG_INF, floor)
    return lo, hi


@dataclass
class _Pass:
    """Per-tensor results of one bracket pass: weight >= hi, weight > lo, scores strictly inside."""

    at_hi: list[int]
    above_lo: list[int]
    inside: list[torch.Tensor]
    inside_w: list[torch.Tensor | None]


def _ones_if_none(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(len(x), dtype=torch.long) if w is None else w.long()


def _count_pass(work: list[torch.Tensor], sizes: list[torch.Tensor | None], lo: float, hi: float) -> _Pass:
    res = _Pass([], [], [], [])
    for t, s in zip(work, sizes):
        ge_hi = t >= hi
        band = torch.logical_xor(t > lo, ge_hi)  # lo < t < hi, as hi > lo
        res.at_hi.append(_weight(ge_hi, s))
        res.inside.append(t[band])
        res.inside_w.append(None if s is None else s[band])
        inside_w = len(res.inside[-1]) if s is None else int(res.inside_w[-1].sum())
        res.above_lo.append(res.at_hi[-1] + inside_w)
    return res


def _ties_at(work: list[torch.Tensor], sizes: list[torch.Tensor | None], value: float) -> list[int]:
    """Weight of units scoring exactly ``value``, per tensor."""
    return [_weight(t == value, s) for t, s in zip(work, sizes)]


def _mark_(work: list[torch.Tensor], sizes: list[torch.Tensor | None], tau: float, above: list[int],
           ties: list[int], room: int) -> list[int]:
    """Mark every unit scoring > τ (``above[i]`` entries in tensor i), then the ties at τ (``ties[i]``)
    in tie order while they fit in ``room`` entries; stop at the first that does not."""
    taken, stop = [], False
    for t, s, got, n_tie in zip(work, sizes, above, ties):
        if got:
            t.masked_fill_(t > tau, NEG_INF)
        if n_tie and not stop:
            eq = torch.nonzero(t.view(-1) == tau).flatten()
            cs = torch.cumsum(torch.ones_like(eq) if s is None else s.view(-1)[eq], 0)
            n = int((cs <= room).sum())
            t.view(-1)[eq[:n]] = NEG_INF
            used = int(cs[n - 1]) if n else 0
            got, room, stop = got + used, room - used, n < len(eq)
        taken.append(got)
    return taken


def _sample_size(total: int, cap: int) -> int:
    """Sample ~1/64 of the entries, at least 2**14, at most ``cap``: small stages need few samples."""
    return min(cap, max(1 << 14, total // 64))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch CPU ops on ``n`` threads inside the block (the previous count is restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded() -> contextlib.AbstractContextManager[None]:
    """Run torch CPU ops on one thread inside the block (restored after).

    The selection passes are memory-bound elementwise ops on tensors of ~1M entries; with 2 OpenMP threads
    on a shared 2-core machine each op waited ~10 ms at a barrier for a descheduled thread (measured: the
    same pass 40-100x slower than on one thread), and on an idle machine a second thread gains little."""
    return torch_threads(1)


def take_top_(work: list[torch.Tensor], k: int, sizes: list[torch.Tensor | None] | None = None,
              sample_size: int = SAMPLE_SIZE) -> TakeResult:
    """Take the top units of ``work`` (in place: chosen scores become -inf) until k entries (see the budget
    rule in the module docstring). ``sizes[i]`` (long, shaped like work[i]) are unit sizes, None = 1."""
    with single_threaded():
        return _take_top(work, k, sizes, sample_size)


def _take_top(work: list[torch.Tensor], k: int, sizes: list[torch.Tensor | None] | None,
              sample_size: int) -> TakeResult:
    sizes = list(sizes) if sizes is not None else [None] * len(work)
    if k <= 0 or not work:
        return TakeResult(None, [0] * len(work))
    v, w = _sample(work, sizes, _sample_size(sum(t.numel() for t in work), sample_size))
    widen, known = (1, 1), (NEG_INF, math.inf)
    while True:
        lo, hi = _bracket(v, w, k, widen, known)
        cp = _count_pass(work, sizes, lo, hi)
        A, above = sum(cp.at_hi), sum(cp.above_lo)
        if lo == NEG_INF and above <= k:  # everything available fits
            for t in work:
                t.fill_(NEG_INF)
            return TakeResult(None, list(cp.above_lo))
        if A > k:  # τ >= hi: search above
            widen, known = (widen[0] * 4, widen[1]), (hi, known[1])
            continue
        ties_lo = _ties_at(work, sizes, lo) if (above <= k and lo > NEG_INF) else [0] * len(work)
        if k < above + sum(ties_lo):
            break
        widen, known = (widen[0], widen[1] * 4), (known[0], lo)  # τ < lo: search below
    inside = torch.cat(cp.inside)
    order = torch.argsort(inside, descending=True)
    if all(s is None for s in sizes):
        cum = A + torch.arange(1, len(inside) + 1)
    else:
        cum = A + torch.cumsum(torch.cat([_ones_if_none(x, ws) for x, ws in zip(cp.inside, cp.inside_w)])[order], 0)
    over = torch.nonzero(cum > k).flatten()
    if len(over):  # τ is a score strictly inside the bracket
        tau = float(inside[order[over[0]]])
        above_i = [a + _weight(x > tau, ws) for a, x, ws in zip(cp.at_hi, cp.inside, cp.inside_w)]
        ties = [_weight(x == tau, ws) for x, ws in zip(cp.inside, cp.inside_w)]
    else:  # τ = lo, reached through its ties
        tau, above_i, ties = lo, cp.above_lo, ties_lo
    return TakeResult(tau, _mark_(work, sizes, tau, above_i, ties, k - sum(above_i)))


def take_top_reference_(work: list[torch.Tensor], k: int,
                        sizes: list[torch.Tensor | None] | None = None) -> TakeResult:
    """ORACLE for take_top_: concatenate every score, stable-sort descending, take the prefix that fits."""
    sizes = list(sizes) if sizes is not None else [None] * len(work)
    if k <= 0 or not work:
        return TakeResult(None, [0] * len(work))
    vals = torch.cat([t.flatten().double() for t in work]) if work else torch.zeros(0, dtype=torch.float64)
    wts = torch.cat([torch.ones(t.numel(), dtype=torch.long) if s is None else s.flatten().long()
                     for t, s in zip(work, sizes)]) if work else torch.zeros(0, dtype=torch.long)
    owner = torch.cat([torch.full((t.numel(),), i) for i, t in enumerate(work)]) if work else wts
    pos = torch.cat([torch.arange(t.numel()) for t in work]) if work else wts
    order = torch.sort(vals, descending=True, stable=True).indices
    order = order[vals[order] > NEG_INF]
    fits = torch.cumsum(wts[order], 0) <= k
    n = int(fits.sum()) if bool(fits.all()) else int(torch.nonzero(~fits).flatten()[0])
    chosen, left_out = order[:n], order[n:]
    tau = float(vals[left_out[0]]) if len(left_out) else None
    taken = torch.bincount(owner[chosen], weights=wts[chosen].double(), minlength=len(work)).long().tolist()
    for i, t in enumerate(work):
        t.view(-1)[pos[chosen][owner[chosen] == i]] = NEG_INF
    return TakeResult(tau, taken)
