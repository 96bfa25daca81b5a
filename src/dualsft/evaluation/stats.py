"""Uncertainty of a comparison (docs/method.md §6): mean ± 95% bootstrap CI over seeds × test examples,
paired differences between two methods, and a win/tie/loss judgement from the CI of the difference.

Input: per-example scores of one method as a tensor ``x`` [S, Q] (S seeds = training runs, Q test
examples; e.g. exact match 0/1 or a per-example loss). Every seed is evaluated on the SAME Q test items,
and two methods compared are run with the same S seeds (row s of A pairs with row s of B).

Resampling unit (a crossed two-way bootstrap): each replicate draws S seeds with replacement AND Q
examples with replacement, and the same example draw is used for every drawn seed. Seeds and examples
are crossed, not nested: an item that is hard is hard for every seed, so the finite test set is one
source of error shared by all seeds, and drawing examples independently inside each seed would shrink
that term by a factor S (too narrow a CI). The crossed bootstrap counts the seed term σ²_seed/S and the
item term σ²_item/Q each once (plus the interaction, slightly conservatively). With S = 1 it is the
ordinary bootstrap over examples. The interval is the percentile interval of the replicate means.
Deterministic: the draws come from a ``torch.Generator`` seeded with ``seed``, so the same inputs and
seed give the same interval bit for bit; A and B of a paired difference share every draw.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from dualsft.errors import ConfigError

__all__ = ["Interval", "bootstrap_indices", "bootstrap_means", "bootstrap_means_reference", "mean_ci",
           "paired_difference", "judge", "tally"]

Verdict = Literal["win", "tie", "loss"]


@dataclass(frozen=True)
class Interval:
    """A point estimate (the plain mean over all S·Q scores) and its percentile bootstrap interval."""

    mean: float
    low: float
    high: float
    level: float
    n_seeds: int
    n_examples: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "level": self.level,
                "n_seeds": self.n_seeds, "n_examples": self.n_examples}


def as_scores(x: torch.Tensor | Iterable[Iterable[float]]) -> torch.Tensor:
    """[S, Q] float64 scores; raises ConfigError on another shape, an empty axis or a non-finite score."""
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.dim() != 2 or 0 in t.shape:
        raise ConfigError(f"scores must be [seeds, examples] with both non-empty, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ConfigError("scores contain NaN or inf; drop or fix those examples before the bootstrap")
    return t


def bootstrap_indices(S: int, Q: int, n_boot: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The replicates' draws: seed rows [R, S] and example columns [R, Q] (int64, with replacement)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(S, (n_boot, S), generator=g)
    cols = torch.randint(Q, (n_boot, Q), generator=g)
    return rows, cols


def bootstrap_means(x: torch.Tensor, n_boot: int = 4000, seed: int = 0) -> torch.Tensor:
    """Replicate means [R] of scores ``x`` [S, Q] under the crossed bootstrap (module docstring).

    Fast path: a replicate's mean of x[rows][:, cols] is c_rᵀ x w_r / (S·Q), with c_r [S] and w_r [Q]
    the draw counts, so no [R, S, Q] tensor is formed. ``bootstrap_means_reference`` is its oracle.
    """
    x = as_scores(x)
    S, Q = x.shape
    rows, cols = bootstrap_indices(S, Q, n_boot, seed)
    c = torch.zeros(n_boot, S, dtype=torch.float64).scatter_add_(1, rows, torch.ones_like(rows, dtype=torch.float64))
    w = torch.zeros(n_boot, Q, dtype=torch.float64).scatter_add_(1, cols, torch.ones_like(cols, dtype=torch.float64))
    return torch.einsum("rs,sq,rq->r", c, x, w) / (S * Q)  # [R]


def bootstrap_means_reference(x: torch.Tensor, n_boot: int = 4000, seed: int = 0) -> torch.Tensor:
    """The oracle of ``bootstrap_means``: index every replicate explicitly and average. Slow; for tests."""
    x = as_scores(x)
    rows, cols = bootstrap_indices(*x.shape, n_boot, seed)
    return torch.stack([x[r][:, c].mean() for r, c in zip(rows, cols)])


def interval(x: torch.Tensor, level: float, n_boot: int, seed: int) -> Interval:
    """Mean of ``x`` [S, Q] and the percentile interval of its replicate means."""
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ConfigError(f"n_boot must be at least 1, got {n_boot}")
    x = as_scores(x)
    means = bootstrap_means(x, n_boot, seed)
    alpha = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    mean = float(x.mean())
    # a constant input must give a zero-width interval that contains its mean despite float rounding
    return Interval(mean, min(low, mean), max(high, mean), level, *x.shape)


def mean_ci(scores: torch.Tensor | Iterable[Iterable[float]], level: float = 0.95, n_boot: int = 4000,
            seed: int = 0) -> Interval:
    """Mean ± ``level`` bootstrap CI of one method's scores [S seeds, Q examples] (crossed bootstrap)."""
    return interval(as_scores(scores), level, n_boot, seed)


def paired_difference(a: torch.Tensor | Iterable[Iterable[float]], b: torch.Tensor | Iterable[Iterable[float]],
                      level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> Interval:
    """Mean of A − B and its bootstrap CI, paired on the same seeds and test items.

    ``a``, ``b``: [S, Q] scores of methods A and B, row s = seed s, column q = test item q in both. The
    difference d = a − b [S, Q] is bootstrapped as one method's scores, i.e. A and B share every draw,
    so what the two methods have in common (hard items, a lucky seed) cancels.
    """
    a, b = as_scores(a), as_scores(b)
    if a.shape != b.shape:
        raise ConfigError(f"paired scores need the same [seeds, examples] shape, got {tuple(a.shape)} and "
                          f"{tuple(b.shape)}: evaluate both methods on the same seeds and test items")
    return interval(a - b, level, n_boot, seed)


def judge(diff: Interval) -> Verdict:
    """Win if the CI of A − B lies above 0, loss if below 0, else tie (a CI touching 0 is a tie).

    For a score where lower is better (a loss), pass B − A."""
    if diff.low > 0.0:
        return "win"
    if diff.high < 0.0:
        return "loss"
    return "tie"


def tally(verdicts: Iterable[Verdict]) -> dict[str, int]:
    """{"win": n, "tie": n, "loss": n} over several judgements (e.g. one per target task and baseline)."""
    counts = Counter(verdicts)
    unknown = set(counts) - {"win", "tie", "loss"}
    if unknown:
        raise ConfigError(f"verdicts must be win, tie or loss, got {sorted(unknown)}")
    return {v: counts.get(v, 0) for v in ("win", "tie", "loss")}
