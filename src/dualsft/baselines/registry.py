"""Matched-budget baselines by name: ``select_baseline(data_method, param_method, ctx, order)``.

Every method gets the same budgets from the context (exactly b examples, exactly k entries; ``all``,
``full`` and ``lora`` are the documented exceptions) and returns a cost record. Sequential hybrids:
    order="data_first"   less→sift: the subset first, then the parameter selector scored ON that subset
    order="param_first"  sift→less: the mask first, then the data selector restricted to the masked entries
    order="independent"  each axis scored on its own (sift on the whole pool, less unrestricted)
The registries are plain dicts of functions. DualSFT is one of the methods: its data selector and mask
selector read a run's saved scores (``ctx.dualsft``: RUN/scores, φ_data and φ_param) and rank them as
`dualsft select` does (docs/method.md §5 step 4); a mask or subset handed over by a hybrid order does not
change those scores, so it is ignored, as by random, loss and magnitude.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from dualsft.baselines.budget import resolve_budget, top_b
from dualsft.baselines.cost import Cost, combine
from dualsft.baselines.data import loss_subset, pool_indices, random_subset
from dualsft.baselines.less import LessConfig, less_scores
from dualsft.baselines.params import lora_rank_for_budget, magnitude_mask, random_mask, sift_mask, sift_published_mask
from dualsft.errors import ConfigError
from dualsft.scoring.stats import trainable_params
from dualsft.selection.policy import MaskSpec, select_mask, select_subset
from dualsft.selection.select import read_data_scores, read_safetensors

Batch = dict[str, torch.Tensor]
Order = Literal["independent", "data_first", "param_first"]
HYBRIDS: dict[str, tuple[str, str, Order]] = {
    "less→sift": ("less", "sift", "data_first"), "less->sift": ("less", "sift", "data_first"),
    "sift→less": ("less", "sift", "param_first"), "sift->less": ("less", "sift", "param_first"),
    "less→sift-global": ("less", "sift-global", "data_first"), "less->sift-global": ("less", "sift-global", "data_first"),
    "sift-global→less": ("less", "sift-global", "param_first"),
    "sift-global->less": ("less", "sift-global", "param_first"),
}


@dataclass(frozen=True)
class DualSFTScores:
    """What the "dualsft" selectors read: a run's scores folder (data_scores.jsonl, param_scores.safetensors)
    and the mask policy they apply (`dualsft select`'s quotas, filters, units and mask sign)."""

    folder: Path
    mask: MaskSpec = field(default_factory=MaskSpec)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))  # a str path works too


@dataclass
class BaselineContext:
    """Everything a baseline may use. ``model`` is θw (the scoring checkpoint), ``base_model`` θ0 (defaults
    to ``model``). ``b`` and ``k`` are exact counts (see ``make_context`` for fractions)."""

    model: torch.nn.Module
    pool_batches: list[Batch]
    b: int
    k: int
    target_batches: list[Batch] = field(default_factory=list)
    base_model: torch.nn.Module | None = None
    curvature: dict[str, torch.Tensor] | None = None   # c: raw Adam exp_avg_sq of the warm-up
    exp_avg: dict[str, torch.Tensor] | None = None     # Adam exp_avg of the warm-up, if saved
    seed: int = 0
    less: LessConfig = field(default_factory=LessConfig)
    quotas: tuple[float, float] = (0.0, 0.0)  # (layer, module) quotas for masks; 0 = global top-k like the originals
    progress: bool = False                               # tqdm bars over the long passes
    dualsft: DualSFTScores | None = None                 # the saved scores the "dualsft" selectors rank

    @property
    def theta0(self) -> torch.nn.Module:
        return self.base_model if self.base_model is not None else self.model


def make_context(model: torch.nn.Module, pool_batches: list[Batch], data_budget: float | int,
                 param_budget: float | int, **kw: Any) -> BaselineContext:
    """A context with b, k resolved from counts or fractions of N (pool examples) and d (trainable entries)."""
    N = len(pool_indices(pool_batches))
    d = sum(p.numel() for p in trainable_params(model).values())
    return BaselineContext(model, pool_batches, resolve_budget(data_budget, N, "data budget"),
                           resolve_budget(param_budget, d, "parameter budget"), **kw)


@dataclass
class DataResult:
    """subset: stable indices in pool order; scores: {index: score} for the subset (None if unscored)."""

    subset: list[int]
    scores: dict[int, float] | None
    cost: Cost


@dataclass
class ParamResult:
    """mask: {name: sorted flat indices} or None (train every entry / LoRA); trainable: entries trained."""

    mask: dict[str, torch.Tensor] | None
    trainable: int
    info: dict[str, Any]
    cost: Cost


@dataclass
class BaselineSelection:
    """A baseline's choice: subset (exactly b stable indices, pool order; all N for "all"), mask or None,
    the number of trainable entries, method info and the summed cost record."""

    data_method: str
    param_method: str
    order: str
    subset: list[int]
    subset_scores: dict[int, float] | None
    mask: dict[str, torch.Tensor] | None
    shapes: dict[str, tuple[int, ...]]
    trainable: int
    info: dict[str, Any]
    cost: dict[str, Any]


DataSelector = Callable[[BaselineContext, "dict[str, torch.Tensor] | None"], DataResult]
ParamSelector = Callable[[BaselineContext, "list[int] | None"], ParamResult]


def _data_random(ctx: BaselineContext, mask: dict[str, torch.Tensor] | None) -> DataResult:
    cost = Cost().start()
    subset = random_subset(pool_indices(ctx.pool_batches), ctx.b, ctx.seed)
    return DataResult(subset, None, cost.stop())


def _data_all(ctx: BaselineContext, mask: dict[str, torch.Tensor] | None) -> DataResult:
    return DataResult(pool_indices(ctx.pool_batches), None, Cost())


def _data_loss(ctx: BaselineContext, mask: dict[str, torch.Tensor] | None) -> DataResult:
    cost = Cost().start()
    subset, scores = loss_subset(ctx.theta0, ctx.pool_batches, ctx.b, cost)
    return DataResult(subset, scores, cost.stop())


def _data_less(ctx: BaselineContext, mask: dict[str, torch.Tensor] | None) -> DataResult:
    if not ctx.target_batches:
        raise ConfigError("LESS needs target (validation) examples: the context has no target batches")
    cost = Cost().start()
    scores, idx = less_scores(ctx.model, ctx.pool_batches, ctx.target_batches, ctx.less, ctx.seed,
                              ctx.curvature, ctx.exp_avg, mask, cost, ctx.progress)
    subset = top_b(scores, idx, ctx.b)
    by_index = dict(zip(idx, scores.tolist()))
    return DataResult(subset, {i: by_index[i] for i in subset}, cost.stop())


def _scores(ctx: BaselineContext) -> DualSFTScores:
    if ctx.dualsft is None:
        raise ConfigError("the dualsft method ranks a run's saved scores: build the context with "
                          "dualsft=DualSFTScores(RUN/scores) after `dualsft score`")
    return ctx.dualsft


def _data_dualsft(ctx: BaselineContext, mask: dict[str, torch.Tensor] | None) -> DataResult:
    scores = _scores(ctx)
    cost = Cost().start()
    indices, phi = read_data_scores(scores.folder / "data_scores.jsonl")
    chosen = select_subset(phi, ctx.b).positions.tolist()  # signed φ_data, pool order
    return DataResult([indices[p] for p in chosen], {indices[p]: float(phi[p]) for p in chosen}, cost.stop())


def _param_random(ctx: BaselineContext, subset: list[int] | None) -> ParamResult:
    cost = Cost().start()
    mask = random_mask(trainable_params(ctx.theta0), ctx.k, ctx.seed, ctx.quotas)
    return ParamResult(mask, ctx.k, {}, cost.stop())


def _param_magnitude(ctx: BaselineContext, subset: list[int] | None) -> ParamResult:
    cost = Cost().start()
    mask = magnitude_mask(trainable_params(ctx.theta0), ctx.k, ctx.quotas)
    return ParamResult(mask, ctx.k, {"weights": "theta0"}, cost.stop())


def _param_sift(ctx: BaselineContext, subset: list[int] | None) -> ParamResult:
    """SIFT as published: |grad| of the FIRST batch at θ0, projection matrices only, equal density per matrix."""
    cost = Cost().start()
    batches = ctx.pool_batches if subset is None else subset_batches(ctx.pool_batches, subset)
    mask, _ = sift_published_mask(ctx.theta0, batches[0], ctx.k, cost)
    scored_on = "pool" if subset is None else "subset"
    return ParamResult(mask, ctx.k, {"scored_on": f"first batch of the {scored_on}", "checkpoint": "theta_0",
                                     "matrices": "projections, equal density"}, cost.stop())


def _param_sift_global(ctx: BaselineContext, subset: list[int] | None) -> ParamResult:
    """This project's earlier variant: global top-|G| over every tensor, G summed over the whole pool/subset at θw."""
    cost = Cost().start()
    batches = ctx.pool_batches if subset is None else subset_batches(ctx.pool_batches, subset)
    mask, _ = sift_mask(ctx.model, batches, trainable_params(ctx.model), ctx.k, cost, ctx.quotas)
    scored_on = "pool" if subset is None else "subset"
    return ParamResult(mask, ctx.k, {"scored_on": scored_on, "checkpoint": "theta_w"}, cost.stop())


def _param_dualsft(ctx: BaselineContext, subset: list[int] | None) -> ParamResult:
    scores = _scores(ctx)
    cost = Cost().start()
    phi = read_safetensors(scores.folder / "param_scores.safetensors")
    mask = select_mask(phi, scores.mask, consume=True, k=ctx.k)
    return ParamResult(mask.indices, mask.n_selected, {"scores": str(scores.folder)}, cost.stop())


def _param_full(ctx: BaselineContext, subset: list[int] | None) -> ParamResult:
    d = sum(p.numel() for p in trainable_params(ctx.theta0).values())
    return ParamResult(None, d, {"train": "--mask none"}, Cost())


def _param_lora(ctx: BaselineContext, subset: list[int] | None) -> ParamResult:
    r, count = lora_rank_for_budget(ctx.theta0, ctx.k)
    return ParamResult(None, count, {"lora_rank": r, "lora_target_modules": "all-linear",
                                     "lora_trainable": count, "k": ctx.k}, Cost())


DATA_SELECTORS: dict[str, DataSelector] = {
    "random": _data_random, "loss": _data_loss, "all": _data_all, "less": _data_less, "dualsft": _data_dualsft}
PARAM_SELECTORS: dict[str, ParamSelector] = {
    "random": _param_random, "magnitude": _param_magnitude, "sift": _param_sift, "sift-global": _param_sift_global,
    "full": _param_full, "lora": _param_lora, "dualsft": _param_dualsft}


def subset_batches(batches: Sequence[Batch], subset: Sequence[int], batch_size: int | None = None) -> list[Batch]:
    """The examples of ``subset`` re-packed into right-padded batches (pad id 0, label -100, attention 0).

    Each row keeps only its real tokens (attention_mask == 1), so left- or right-padded input both work.
    ``batch_size`` defaults to the largest input batch.
    """
    want = set(int(i) for i in subset)
    rows = []
    for b in batches:
        for r, i in enumerate(b["index"].tolist()):
            if i in want:
                keep = b["attention_mask"][r].bool()
                rows.append((i, b["input_ids"][r][keep], b["labels"][r][keep]))
    if len(rows) != len(want):
        missing = sorted(want - {i for i, _, _ in rows})[:10]
        raise ConfigError(f"subset names examples not in the pool: {missing}")
    size = batch_size or max(int(b["input_ids"].shape[0]) for b in batches)
    out = []
    for s in range(0, len(rows), size):
        chunk = rows[s:s + size]
        T = max(len(ids) for _, ids, _ in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        lab = torch.full((len(chunk), T), -100, dtype=torch.long)
        att = torch.zeros(len(chunk), T, dtype=torch.long)
        for j, (_, x, y) in enumerate(chunk):
            ids[j, :len(x)], lab[j, :len(y)], att[j, :len(x)] = x, y, 1
        out.append({"input_ids": ids, "attention_mask": att, "labels": lab,
                    "index": torch.tensor([i for i, _, _ in chunk], dtype=torch.long)})
    return out


def select_baseline(data_method: str, param_method: str, ctx: BaselineContext,
                    order: Order = "independent") -> BaselineSelection:
    """Run one data method and one parameter method at the context's budgets (see module docstring)."""
    if data_method not in DATA_SELECTORS:
        raise ConfigError(f"unknown data method {data_method!r}; choose from {sorted(DATA_SELECTORS)}")
    if param_method not in PARAM_SELECTORS:
        raise ConfigError(f"unknown parameter method {param_method!r}; choose from {sorted(PARAM_SELECTORS)}")
    pick_data, pick_param = DATA_SELECTORS[data_method], PARAM_SELECTORS[param_method]
    if order == "param_first":
        p = pick_param(ctx, None)
        d = pick_data(ctx, p.mask)
        stages = [(f"param:{param_method}", p.cost), (f"data:{data_method}|mask", d.cost)]
    elif order in ("independent", "data_first"):
        d = pick_data(ctx, None)
        p = pick_param(ctx, d.subset if order == "data_first" else None)
        stages = [(f"data:{data_method}", d.cost), (f"param:{param_method}" + ("|subset" if order == "data_first" else ""),
                                                    p.cost)]
    else:
        raise ConfigError(f"order must be independent, data_first or param_first, got {order!r}")
    params = trainable_params(ctx.theta0)
    shapes = {n: tuple(t.shape) for n, t in params.items()} if p.mask is not None else {}
    info = {"b": len(d.subset), "k": ctx.k, "seed": ctx.seed, **p.info}
    if data_method == "less":
        info["less"] = asdict(ctx.less)
    return BaselineSelection(data_method, param_method, order, d.subset, d.scores, p.mask, shapes, p.trainable,
                             info, combine(stages).as_dict())


def select_hybrid(name: str, ctx: BaselineContext) -> BaselineSelection:
    """``select_baseline`` for a hybrid by name: "less→sift" / "less->sift" or "sift→less" / "sift->less"."""
    if name not in HYBRIDS:
        raise ConfigError(f"unknown hybrid {name!r}; choose from {sorted(HYBRIDS)}")
    data, param, order = HYBRIDS[name]
    return select_baseline(data, param, ctx, order)
