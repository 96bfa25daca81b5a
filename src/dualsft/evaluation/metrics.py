"""Pure evaluation maths: per-example KL(base ‖ tuned), and mean/std/n summaries.

Every reported number is a ``summarise(values)`` dict ``{"mean", "std", "n"}``: over examples within
one run, and over runs (seeds) when several are aggregated with ``aggregate_runs``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dualsft.losses import IGNORE_INDEX


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` of a list of numbers; std is the sample std (ddof=1), 0.0 when n == 1.

    An empty list gives ``{"mean": None, "std": None, "n": 0}`` (JSON-safe, never NaN).
    """
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = math.fsum(vals) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def is_summary(node: Any) -> bool:
    """True for a ``summarise`` output."""
    return isinstance(node, dict) and set(node) == {"mean", "std", "n"}


def aggregate_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine several runs' metric trees (same structure, e.g. one per seed) into one tree.

    Each leaf summary becomes ``summarise`` over the runs' means (so ``n`` = number of runs, ``std`` =
    across-run std) plus ``n_per_run`` (the per-run example counts). Non-summary leaves are kept when
    equal across runs, else listed.
    """
    first = runs[0]
    if is_summary(first):
        means = [r["mean"] for r in runs if r.get("mean") is not None]
        return {**summarise(means), "n_per_run": [r["n"] for r in runs]}
    if isinstance(first, dict):
        keys = [k for k in first if all(isinstance(r, dict) and k in r for r in runs)]
        return {k: aggregate_runs([r[k] for r in runs]) for k in keys}
    return first if all(r == first for r in runs) else list(runs)


def kl_per_token(base_logits: torch.Tensor, tuned_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(base) ‖ softmax(tuned)) per position, in nats.

    Args:
        base_logits, tuned_logits: [B, T, V] (any float dtype; computed in float32 or higher).
    Returns:
        [B, T] non-negative KL divergences.
    """
    dt = torch.promote_types(base_logits.dtype, torch.float32)
    logp = F.log_softmax(base_logits.to(dt), dim=-1)
    logq = F.log_softmax(tuned_logits.to(dt), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def per_example_kl(base_logits: torch.Tensor, tuned_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean KL(base ‖ tuned) of the next-token distributions that predict response tokens.

    Args:
        base_logits, tuned_logits: [B, T, V] outputs on the same batch.
        labels: [B, T] with IGNORE_INDEX on prompt/padding (the positions predicting labels[:, 1:] count).
    Returns:
        [B] mean KL over each example's response tokens (0 for an example with none).
    """
    kl = kl_per_token(base_logits[:, :-1], tuned_logits[:, :-1])  # [B, T-1]: position t predicts token t+1
    mask = labels[:, 1:].ne(IGNORE_INDEX).to(kl.dtype)  # [B, T-1], same shift as losses.token_nll
    return (kl * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
