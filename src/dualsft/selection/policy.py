"""Selection policies: the parameter mask m (top-k of φ_param with quotas, filters and structured units)
and the data subset S (top-b of signed φ_data). docs/method.md §5 step 4.

Mask stages, in this order, each taking only what earlier stages left (no entry is counted twice):
    1. layer quota   floor(quota_layer * k) // L entries per transformer layer (L layers with eligible
                     parameters), each layer's own top units
    2. module quota  floor(quota_module * k) // G entries per module group (G groups present, see
                     names.GROUPS), each group's own top units
    3. global        k minus everything taken so far, top units over all eligible parameters
Rounding remainders, and any share a layer or group cannot fill (too few eligible entries; the unit
rule of topk.py), flow into the global stage, so an element mask has EXACTLY k entries. A structured
mask has at most k, and fewer only by less than the largest unit size.

k counts entries of ALL trainable parameters in the scores (d): ``--param-budget 0.1`` is 10% of the
model whatever --include/--exclude leave eligible; a k above the eligible entries is an error.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from dualsft.errors import BudgetError, SelectionError
from dualsft.selection.mask import compact_indices
from dualsft.selection.names import GROUPS, locate_all
from dualsft.selection.topk import TakeResult, resolve_budget, single_threaded, take_top_
from dualsft.selection.units import parse_granularity, unit_scores, units_to_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskSpec:
    """How to turn φ_param into a mask (the CLI's --param-budget, --mask-sign, --quota-*, filters, units)."""

    budget: float = 0.1
    sign: str = "signed"
    quota_layer: float = 0.2
    quota_module: float = 0.2
    include: str | None = None
    exclude: str | None = None
    granularity: str = "element"


@dataclass
class MaskSelection:
    """A chosen mask: ``indices`` {name: sorted compact flat indices} (dualsft-mask-v1), the parameter
    ``shapes`` of every scored name, k requested, d total and eligible entries, and one record per stage."""

    indices: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    k: int
    d: int
    eligible: int
    stages: list[dict] = field(default_factory=list)

    @property
    def n_selected(self) -> int:
        return sum(int(v.numel()) for v in self.indices.values())


def check_finite_scores(scores: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise SelectionError naming the first tensor with a NaN/inf score (cheap: one sum per tensor first)."""
    for name, t in scores.items():
        if not torch.isfinite(t.sum()) and not bool(torch.isfinite(t).all()):
            raise SelectionError(f"{what}: {name!r} holds NaN/inf scores; rescore (e.g. with --dtype float32)")


def filter_names(names: list[str], include: str | None, exclude: str | None) -> list[str]:
    """Names matching ``include`` (re.search; None = all) and not ``exclude``; a regex that matches
    nothing, or leaves nothing, raises SelectionError."""
    out = names
    for flag, pattern, keep in (("--include", include, True), ("--exclude", exclude, False)):
        if not pattern:
            continue
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise SelectionError(f"{flag} {pattern!r} is not a valid regular expression: {e}") from e
        hits = [n for n in names if rx.search(n)]
        if not hits:
            raise SelectionError(f"{flag} {pattern!r} matches no parameter name; names look like {names[:3]}")
        out = [n for n in out if bool(rx.search(n)) == keep]
    if not out:
        raise SelectionError(f"--include {include!r} / --exclude {exclude!r} leave no parameter to select")
    return out


def check_quotas(quota_layer: float, quota_module: float) -> None:
    """Each quota in [0, 1] and their sum <= 1, else BudgetError."""
    for flag, q in (("--quota-layer", quota_layer), ("--quota-module", quota_module)):
        if not 0 <= q <= 1:
            raise BudgetError(f"{flag} {q!r}: a quota is a share of k in [0, 1]")
    if quota_layer + quota_module > 1 + 1e-12:
        raise BudgetError(f"--quota-layer {quota_layer} + --quota-module {quota_module} = "
                          f"{quota_layer + quota_module:g} > 1; lower one so that they sum to at most 1")


def quota_entries(quota: float, k: int) -> int:
    """floor(quota * k), robust to float noise (0.2 * 10 is 2, not 1)."""
    return math.floor(quota * k + 1e-9)


def _stage(work: list[torch.Tensor], sizes: list[torch.Tensor | None], members: list[int], k: int,
           record: dict) -> dict:
    res: TakeResult = take_top_([work[i] for i in members], k, [sizes[i] for i in members])
    return {**record, "target": k, "taken": res.total, "threshold": res.threshold}


def select_mask(scores: Mapping[str, torch.Tensor], spec: MaskSpec, consume: bool = False,
                k: int | None = None) -> MaskSelection:
    """m = top-k of φ_param (signed, or |φ_param| with sign="abs") under ``spec`` (see module docstring).

    Args:
        scores: φ_param {name: tensor shaped like the parameter}, finite.
        consume: let this function overwrite ``scores`` (saves a copy of every score; the orchestrator
            does this with scores it loaded itself).
        k: an exact entry count overriding ``spec.budget`` (joint refinement keeps k fixed).
    Tie-break: (unit score desc, parameter name asc, flat unit index asc).
    """
    with single_threaded():  # many memory-bound passes over ~1M-entry tensors: see topk.single_threaded
        return _select_mask(scores, spec, consume, k)


@dataclass(frozen=True)
class MaskRequest:
    """A validated mask request: exact k, the eligible names (sorted), their entry count, and d."""

    k: int
    names: list[str]
    eligible: int
    d: int


def check_mask_request(shapes: Mapping[str, tuple[int, ...]], spec: MaskSpec, k: int | None = None) -> MaskRequest:
    """Validate ``spec`` against parameter shapes alone (no scores needed), raising the typed errors a
    bad request deserves: quotas, sign, granularity, budget, filters."""
    check_quotas(spec.quota_layer, spec.quota_module)
    if spec.sign not in ("signed", "abs"):
        raise SelectionError(f"--mask-sign {spec.sign!r}: use signed or abs")
    parse_granularity(spec.granularity)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    d = sum(numel.values())
    names = filter_names(sorted(shapes), spec.include, spec.exclude)
    eligible = sum(numel[n] for n in names)
    k = resolve_budget(spec.budget, d, "--param-budget", "trainable entries") if k is None else k
    if k > eligible:
        raise BudgetError(f"--param-budget {spec.budget!r} asks for {k} entries but --include/--exclude leave "
                          f"only {eligible}; lower the budget or widen the filters")
    return MaskRequest(k, names, eligible, d)


def _select_mask(scores: Mapping[str, torch.Tensor], spec: MaskSpec, consume: bool, k: int | None) -> MaskSelection:
    shapes = {n: tuple(scores[n].shape) for n in sorted(scores)}
    req = check_mask_request(shapes, spec, k)
    g = parse_granularity(spec.granularity)
    names, k, eligible, d = req.names, req.k, req.eligible, req.d
    check_finite_scores({n: scores[n] for n in names}, "φ_param")
    work, sizes = [], []
    for n in names:
        s = scores[n] if consume else scores[n].clone()
        if spec.sign == "abs":
            s.abs_()
        u, z = unit_scores(s.contiguous(), g)
        work.append(u)
        sizes.append(z)
    locs = locate_all(names)
    stages = _quota_stages(work, sizes, names, locs, k, spec)
    taken = sum(s["taken"] for s in stages)
    stages.append(_stage(work, sizes, list(range(len(names))), k - taken, {"stage": "global"}))
    indices = {}
    for n, u in zip(names, work):
        idx = units_to_indices(torch.isneginf(u), shapes[n], g)
        if idx.numel():
            indices[n] = compact_indices(idx, scores[n].numel(), presorted=True)
    return MaskSelection(indices, shapes, k, d, eligible, stages)


def _quota_stages(work: list[torch.Tensor], sizes: list[torch.Tensor | None], names: list[str],
                  locs: Mapping, k: int, spec: MaskSpec) -> list[dict]:
    """Run the layer-quota then module-quota stages; returns their records."""
    records = []
    layers = sorted({locs[n].layer for n in names if locs[n].layer is not None})
    if spec.quota_layer > 0 and not layers:
        log.warning("--quota-layer %s: no eligible parameter sits in a numbered layer; its share goes to the "
                    "global stage", spec.quota_layer)
    if layers and spec.quota_layer > 0:
        share = quota_entries(spec.quota_layer, k) // len(layers)
        for L in layers:
            members = [i for i, n in enumerate(names) if locs[n].layer == L]
            records.append(_stage(work, sizes, members, share, {"stage": "layer", "layer": L}))
    groups = [gr for gr in GROUPS if any(locs[n].group == gr for n in names)] if spec.quota_module > 0 else []
    share = quota_entries(spec.quota_module, k) // max(len(groups), 1)
    for gr in groups:
        members = [i for i, n in enumerate(names) if locs[n].group == gr]
        records.append(_stage(work, sizes, members, share, {"stage": "module", "group": gr}))
    return records


@dataclass
class SubsetSelection:
    """A chosen subset: ``positions`` (sorted, into the pool/data-scores order), b requested, N, τ."""

    positions: torch.Tensor
    b: int
    N: int
    threshold: float | None


def select_subset(data_scores: torch.Tensor, budget: float | int) -> SubsetSelection:
    """S = top-b of SIGNED φ_data [N], ties to the earlier pool position (docs/method.md §5 step 4).

    Examples are always ranked by signed φ_data: a negative score predicts harm, however large (only the
    mask has a |φ| option). ``budget``: a float is resolved by resolve_budget (fraction or count); an int is
    an exact count b."""
    N = int(data_scores.numel())
    b = budget if isinstance(budget, int) else resolve_budget(budget, N, "--data-budget", "pool examples")
    check_finite_scores({"data_scores": data_scores}, "φ_data")
    work = data_scores.double().clone()
    res = take_top_([work], b)
    return SubsetSelection(torch.nonzero(torch.isneginf(work)).flatten(), b, N, res.threshold)
