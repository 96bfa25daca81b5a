"""LESS-style data scores: cosine similarity of projected, Adam-preconditioned per-example gradients at
the warm-up checkpoint θw to the target (validation) gradients. See docs/baselines.md for every difference
from LESS (Xia et al. 2024, princeton-nlp/LESS).

Per pool example n, per featurised parameter tensor (linear layers, see pergrad.py):
    "adam"  (LESS's Adam update direction, one simulated step from the warm-up state):
            Γ(g_n) = (β1 m + (1-β1) g_n) / sqrt(β2 c + (1-β2) g_n² + ε)
            with c = raw Adam exp_avg_sq of the warm-up and m = its exp_avg (0 when not available)
    "rsqrt" (diagonal preconditioning by the same curvature): Γ(g_n) = g_n / (sqrt(c) + ε)
    "none"  Γ(g_n) = g_n
then f_n = P Γ(g_n) (P: the seeded SignFoldSketch, k = dim). Target examples q use plain gradients, as in
LESS: t_q = P g_q. The score (LESS's, for one target task and one checkpoint) is the mean cosine

    φ_less[n] = mean_q cos(f_n, t_q) = ⟨f_n/‖f_n‖, mean_q t_q/‖t_q‖⟩

("mean_cosine"), or with ``target="mean_gradient"`` the cosine to the projected mean target gradient,
cos(f_n, mean_q t_q). Under a mask m (sift→less) every Γ(g) and g is multiplied by m before projecting.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from dualsft.baselines.cost import Cost
from dualsft.baselines.pergrad import Layer, backward_per_example, linear_layers
from dualsft.baselines.sketch import SignFoldSketch
from dualsft.errors import ConfigError
from dualsft.scoring.passes import BatchOut, Step, run_pass
from dualsft.scoring.stats import model_inputs
from dualsft.selection.mask import indices_to_dense

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Transform = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LessConfig:
    """Options of the LESS-style selector."""

    dim: int = 8192                       # k of the projection (LESS: 8192)
    precondition: Literal["adam", "rsqrt", "none"] = "adam"
    target: Literal["mean_cosine", "mean_gradient"] = "mean_cosine"
    beta1: float = 0.9                    # LESS's simulated Adam step (its defaults)
    beta2: float = 0.999
    eps: float = 1e-8
    include_head: bool = False            # featurise an untied LM head too (large: V × hidden per example)
    modules: str | None = None            # regex (re.search on module names) restricting the featurised layers


def precondition(g: torch.Tensor, c: torch.Tensor | None, m: torch.Tensor | None, cfg: LessConfig) -> torch.Tensor:
    """Γ(g) elementwise for per-example gradients g [B, *shape]; c, m shaped like one parameter (None = 0).

    Written for memory bandwidth (it runs over every featurised entry of every example): the constants
    are folded into a per-parameter term computed once over D entries, leaving three passes over B×D:
        Γ_adam = (g + β1/(1-β1) m) / sqrt((β2 c + ε)/(1-β1)² + (1-β2)/(1-β1)² g²)
    which equals (β1 m + (1-β1) g) / sqrt(β2 c + (1-β2) g² + ε).
    """
    if cfg.precondition == "none":
        return g
    c = torch.zeros((), dtype=g.dtype, device=g.device) if c is None else c.to(device=g.device, dtype=g.dtype)
    if cfg.precondition == "rsqrt":
        return torch.div(g, c.sqrt() + cfg.eps)
    if cfg.precondition == "adam":
        scale = (1 - cfg.beta1) ** 2
        den = torch.addcmul((cfg.beta2 * c + cfg.eps) / scale, g, g, value=(1 - cfg.beta2) / scale).sqrt_()
        num = g if m is None else torch.add(g, m.to(g), alpha=cfg.beta1 / (1 - cfg.beta1))
        return torch.div(num, den)
    raise ConfigError(f"--less-precondition must be adam, rsqrt or none, got {cfg.precondition!r}")


def make_transform(cfg: LessConfig, curvature: Mapping[str, torch.Tensor] | None,
                   exp_avg: Mapping[str, torch.Tensor] | None, dense_mask: Mapping[str, torch.Tensor] | None,
                   compute_dtype: torch.dtype, use_precondition: bool) -> Transform:
    """(name, g [B, *shape]) -> Γ(g) ⊙ m in ``compute_dtype`` (Γ = identity when not ``use_precondition``)."""
    warned: set[str] = set()

    def transform(name: str, g: torch.Tensor) -> torch.Tensor:
        g = g.to(compute_dtype)
        if use_precondition and cfg.precondition != "none":
            c = curvature.get(name) if curvature is not None else None
            if c is None and name not in warned:
                warned.add(name)
                log.warning("LESS: no curvature (exp_avg_sq) for %s; preconditioning with c = 0 there", name)
            g = precondition(g, c, exp_avg.get(name) if exp_avg is not None else None, cfg)
        if dense_mask is not None:
            g = g * dense_mask[name].to(device=g.device, dtype=g.dtype) if name in dense_mask else torch.zeros_like(g)
        return g

    return transform


def projected_grads(model: torch.nn.Module, batches: Sequence[Batch], layers: Sequence[Layer], sketch: SignFoldSketch,
                    transform: Transform, cost: Cost, progress: Any | None = None) -> tuple[torch.Tensor, list[int]]:
    """f_n = P transform(g_n) for every example: ([N, dim] float, stable indices [N]). One forward +
    one backward per batch (a pass of scoring/passes.py); per-example gradients exist one layer at a time.
    ``progress``: optional tqdm bar advanced by examples."""
    res = run_pass(batches, projection_step(model, layers, sketch, transform, cost), progress=progress)
    if not res.rows:
        return torch.zeros(0, sketch.dim), []
    return res.rows["features"], [int(i) for i in res.rows["index"]]


def projection_step(model: torch.nn.Module, layers: Sequence[Layer], sketch: SignFoldSketch, transform: Transform,
                    cost: Cost) -> Step:
    """The per-batch function of the LESS pass: rows "features" = P transform(g_n) [B, dim] and "index"."""
    device = next(model.parameters()).device
    acc_dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32

    def step(batch: Batch) -> BatchOut:
        inputs = model_inputs(batch, device)
        B = int(inputs["input_ids"].shape[0])
        z = sketch.new_buffer(B, acc_dtype, device)
        backward_per_example(model, inputs, layers, _projector(sketch, z, transform))
        cost.count(B, backward=True)
        return BatchOut(B, rows={"features": sketch.finish(z), "index": batch["index"]})

    return step


def _projector(sketch: SignFoldSketch, z: torch.Tensor, transform: Transform) -> Callable[[str, torch.Tensor], None]:
    """Callback: z += fold(transform(g)) for one parameter's per-example gradients g [B, *shape]."""
    def add(name: str, g: torch.Tensor) -> None:
        sketch.add(z, name, transform(name, g).reshape(g.shape[0], -1))

    return add


def cosine_scores(pool_feats: torch.Tensor, target_feats: torch.Tensor, target: str = "mean_cosine") -> torch.Tensor:
    """φ_less [N] float64 from f [N, k] and t [Q, k] (see module docstring). Zero rows score 0."""
    f = torch.nn.functional.normalize(pool_feats.double(), dim=1)
    t = target_feats.double()
    if target == "mean_cosine":
        direction = torch.nn.functional.normalize(t, dim=1).mean(0)
    elif target == "mean_gradient":
        direction = torch.nn.functional.normalize(t.mean(0), dim=0)
    else:
        raise ConfigError(f"LESS target must be mean_cosine or mean_gradient, got {target!r}")
    return f @ direction


def less_scores(model: torch.nn.Module, pool_batches: Sequence[Batch], target_batches: Sequence[Batch],
                cfg: LessConfig, seed: int, curvature: Mapping[str, torch.Tensor] | None = None,
                exp_avg: Mapping[str, torch.Tensor] | None = None,
                mask: Mapping[str, torch.Tensor] | None = None, cost: Cost | None = None,
                progress: bool = False) -> tuple[torch.Tensor, list[int]]:
    """φ_less for every pool example at ``model`` (θw): (scores [N] float64, stable indices [N]).

    ``curvature`` c (Adam exp_avg_sq of the warm-up, {name: tensor}) is required for "adam"/"rsqrt";
    ``mask`` ({name: flat indices}, the selection format) restricts every gradient to the masked entries.
    """
    if cfg.precondition != "none" and curvature is None:
        raise ConfigError("LESS preconditioning needs the warm-up's Adam exp_avg_sq (RUN/warmup); run "
                          "`dualsft warmup` first or pass --less-precondition none")
    cost = cost if cost is not None else Cost()
    layers = [ly for ly in linear_layers(model, include_head=cfg.include_head)
              if cfg.modules is None or re.search(cfg.modules, ly.module_name)]
    if not layers:
        raise ConfigError(f"LESS found no trainable linear layer to featurise (modules={cfg.modules!r})")
    params = dict(model.named_parameters())
    dense = None
    if mask is not None:
        dense = {n: indices_to_dense(idx, params[n].shape, params[n].device) for n, idx in mask.items() if n in params}
        covered = {n for ly in layers for n in (ly.weight, ly.bias) if n}
        if not covered & set(dense):
            log.warning("LESS under a mask: no masked entry lies in a featurised linear layer; every score is 0")
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    sketch = SignFoldSketch(cfg.dim, seed)
    n_all = sum(int(b["input_ids"].shape[0]) for b in (*target_batches, *pool_batches))
    log.info("LESS: featurising %d layers (%d entries) of %d target + pool examples into %d dims",
             len(layers), sum(dict(model.named_parameters())[n].numel() for ly in layers
                              for n in (ly.weight, ly.bias) if n), n_all, cfg.dim)
    with tqdm(total=n_all, unit="ex", desc="LESS gradients", disable=not progress) as bar:
        plain = make_transform(cfg, curvature, exp_avg, dense, dtype, use_precondition=False)
        target_feats, _ = projected_grads(model, target_batches, layers, sketch, plain, cost, bar)
        adam = make_transform(cfg, curvature, exp_avg, dense, dtype, use_precondition=True)
        pool_feats, indices = projected_grads(model, pool_batches, layers, sketch, adam, cost, bar)
    return cosine_scores(pool_feats, target_feats, cfg.target), indices
