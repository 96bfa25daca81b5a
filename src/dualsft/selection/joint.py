"""True joint refinement of the mask m and the subset S (docs/method.md §7; not in the authors' release).

Starting from the independent choice (m0 = top-k of φ_param, S0 = top-b of φ_data), each round does
    parameter step   G_S = Σ_{n∈S} g_n;  m ← top-k of t(S),
                     t_j(S) = η v_j G_Sj − ½ η² c_j G_Sj²   (order 2)   or   η v_j G_Sj   (order 1)
    data step        u(S) = η v − ½ η² c ⊙ G_S  (or η v);  S ← top-b of ⟨u(S) ⊙ m, g_n⟩ over the pool
and records the surrogate I(m, S) = η vᵀ(m⊙G_S) − ½η² Σ_j m_j c_j G_Sj² (docs/method.md §3; c = 0 for
order 1) after every half-step. t(S), u(S) and I(m, S) are dualsft/method.py's ``subset_term``,
``direction_u`` and ``surrogate_improvement``: t(S) is φ_param computed on the subset, t(S) = u(S) ⊙ G_S.

Why the parameter step never lowers I: for a fixed S, I(m, S) = Σ_j m_j t_j(S) is a sum of independent
per-entry terms, so over masks with exactly k eligible entries it is maximised by the k largest t_j.
The step ranks by exactly t_j (signed, element granularity, no quotas): I(m_new, S) >= I(m_old, S).
Quotas force entries per layer/group, |t| ranks by magnitude, and whole units trade entries for unit
sums, so with any of those the step is a heuristic and I may drop (the summary says which case holds).
The data step ranks examples by their linear contribution Σ_{n∈S} ⟨u(S)⊙m, g_n⟩ = I(m, S); the
quadratic coupling between examples means I may drop there. The refinement therefore returns the
pair with the highest I it visited (so the result is never worse than the start, by the surrogate).

Cost per round: one gradient_sum pass over the b subset examples (G_S) and one row-score pass over all N
pool examples (a batched JVP ≈ one forward+backward each), i.e. ≈ (N + b) example passes per round, plus
one pass over S0 at the start. Stops early when the subset no longer changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from dualsft.method import direction_u, subset_term
from dualsft.selection.mask import indices_to_dense
from dualsft.selection.policy import MaskSelection, MaskSpec, select_mask, select_subset

log = logging.getLogger(__name__)

ParamDict = dict[str, torch.Tensor]


def masked_u(v: Mapping[str, torch.Tensor], c: Mapping[str, torch.Tensor] | None, G_S: Mapping[str, torch.Tensor],
             eta: float, indices: Mapping[str, torch.Tensor]) -> ParamDict:
    """u(S) ⊙ m, float32, for the data step (u(S) of ``direction_u``, first order when c is None); names
    outside the mask are absent."""
    order = 1 if c is None else 2
    u = direction_u({n: v[n] for n in indices}, eta, order, c, G_S, dtype=torch.float32)
    return {n: t * indices_to_dense(indices[n], t.shape, t.device) for n, t in u.items()}


def dense_masks(indices: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> ParamDict:
    """{name: bool mask shaped like the parameter} for surrogate_improvement."""
    return {n: indices_to_dense(idx, shapes[n]) for n, idx in indices.items()}


@dataclass
class JointResult:
    """The best (m, S) visited: mask, subset positions (into the pool order) with the φ_data-like scores
    that chose them, the I history (one record per half-step) and the example passes spent."""

    mask: MaskSelection
    positions: torch.Tensor
    scores: torch.Tensor
    history: list[dict] = field(default_factory=list)
    passes: dict[str, int] = field(default_factory=dict)
    monotone_guaranteed: bool = False


def refine_jointly(
    v: Mapping[str, torch.Tensor], c: Mapping[str, torch.Tensor] | None, eta: float, spec: MaskSpec,
    mask0: MaskSelection, positions0: torch.Tensor, scores0: torch.Tensor, b: int, rounds: int,
    grad_sum: Callable[[torch.Tensor], ParamDict], row_scores: Callable[[ParamDict], torch.Tensor],
    surrogate: Callable[[ParamDict, ParamDict, ParamDict], float],
) -> JointResult:
    """Alternate the parameter and data steps ``rounds`` times (see the module docstring).

    Args:
        v, c, eta: v = λ_new v_new + λ_prior v_prior, curvature c (None for order 1), step η.
        spec: mask policy; its budget is replaced by k = mask0.k entries; b examples per subset.
        mask0, positions0 [b], scores0 [b]: the independent selection to start from.
        grad_sum(positions) -> G_S over those pool positions; row_scores(u_masked) -> [N] ⟨u_masked, g_n⟩
        in pool order; surrogate(v, G_S, dense_mask) -> I(m, S). Injected so this stays model-agnostic.
    """
    guaranteed = (spec.sign == "signed" and spec.granularity == "element" and spec.quota_layer == 0
                  and spec.quota_module == 0)
    mask, pos, sc = mask0, positions0, scores0
    G_S = grad_sum(pos)
    passes = {"gradient_examples": len(pos), "row_score_examples": 0}
    best = (surrogate(v, G_S, dense_masks(mask.indices, mask.shapes)), mask, pos, sc)
    history = [{"round": 0, "step": "start", "I": best[0]}]
    for r in range(1, rounds + 1):
        prev = mask
        mask = select_mask(subset_term(v, c, G_S, eta), spec, consume=True, k=mask0.k)
        I_m = surrogate(v, G_S, dense_masks(mask.indices, mask.shapes))
        history.append({"round": r, "step": "param", "I": I_m, "mask_entries_changed": _changed(mask, prev)})
        if I_m > best[0]:
            best = (I_m, mask, pos, sc)
        phi = row_scores(masked_u(v, c, G_S, eta, mask.indices))
        passes["row_score_examples"] += len(phi)
        new_pos = select_subset(phi, b).positions  # examples: always signed
        changed = len(set(new_pos.tolist()) - set(pos.tolist()))
        pos, sc = new_pos, phi[new_pos]
        G_S = grad_sum(pos)
        passes["gradient_examples"] += len(pos)
        I_s = surrogate(v, G_S, dense_masks(mask.indices, mask.shapes))
        history.append({"round": r, "step": "data", "I": I_s, "subset_examples_changed": changed})
        log.info("joint round %d: I after parameter step %.6g, after data step %.6g", r, I_m, I_s)
        if I_s > best[0]:
            best = (I_s, mask, pos, sc)
        if changed == 0:
            log.info("joint refinement converged after %d round(s): the subset no longer changes", r)
            break
    return JointResult(best[1], best[2], best[3], history, passes, guaranteed)


def _changed(new: MaskSelection, old: MaskSelection) -> int:
    """Entries in the new mask that were not in the old one."""
    n = 0
    for name, idx in new.indices.items():
        prev = old.indices.get(name)
        n += int(idx.numel()) if prev is None else int((~torch.isin(idx, prev)).sum())
    return n
