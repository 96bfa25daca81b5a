"""Gradient statistics of DualSFT (METHOD.md §3-§4): G, v_new, u, and the surrogate I(m, S).

Public API (other stages import these; signatures are frozen):
    trainable_params(model) -> dict[str, nn.Parameter]
    gradient_sum(model, batches, params) -> dict[str, Tensor]                      # G = Σ_n g_n
    target_gradient(model, batches, params) -> dict[str, Tensor]                   # v_new = mean_V g
    prior_gradient(model, base_model, anchor_batches, params, tau, confidence, normalisation)  # v_prior
    combine_u(v_new, v_prior, G, c, eta, lambda_new, lambda_prior, order) -> (u, v, term_norms)
    surrogate_improvement(v, c, G_S, mask_bool_dict, eta) -> float                 # I(m, S)

Every per-parameter statistic is a ``dict[str, Tensor]`` keyed by the name ``model.named_parameters()``
gives (tied weights appear once, under their first name), shaped like the parameter, and accumulated in
float32 by default (``acc_dtype=torch.float64`` for tests). Accumulators live on the parameter's device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch

from dualsft.errors import ConfigError, NonFiniteLossError
from dualsft.losses import per_example_loss
from dualsft.scoring.prior import prior_gradient  # noqa: F401  (re-exported: part of this module's API)
from dualsft.scoring.progress import PassCheckpoint, remaining, restore

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
ParamDict = dict[str, torch.Tensor]


def trainable_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters with ``requires_grad``, in ``named_parameters()`` order; a tied weight appears ONCE,
    under the name ``named_parameters()`` gives it (e.g. ``model.embed_tokens.weight``, not ``lm_head.weight``)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def zeros_like_params(params: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> ParamDict:
    """One zero accumulator per parameter, shaped like it, on its device, in ``dtype``."""
    return {n: torch.zeros(p.shape, dtype=dtype, device=p.device) for n, p in params.items()}


def check_finite(losses: torch.Tensor, batch: Batch) -> None:
    """Raise NonFiniteLossError naming the stable indices of examples whose loss l_n is NaN/inf."""
    bad = ~torch.isfinite(losses.detach())
    if bad.any():
        idx = batch["index"][bad.cpu()].tolist() if "index" in batch else torch.nonzero(bad).flatten().tolist()
        raise NonFiniteLossError(
            f"non-finite loss for example(s) {idx[:20]}: check those examples (length, content) or use a "
            "higher-precision --dtype", idx)


def model_inputs(batch: Batch, device: torch.device) -> Batch:
    """The tensors the model needs, on its device (``index`` stays on CPU with the caller)."""
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}


def gradient_sum(model: torch.nn.Module, batches: Iterable[Batch], params: Mapping[str, torch.nn.Parameter],
                 acc_dtype: torch.dtype = torch.float32, progress: object | None = None,
                 checkpoint: PassCheckpoint | None = None) -> ParamDict:
    """G = Σ_n g_n = ∇_θ Σ_n l_n(θ) over every example of ``batches`` (METHOD.md §4: a SUM, not a mean).

    One ordinary backward of the summed loss per batch; ``params`` are the tensors differentiated (see
    ``trainable_params``). Returns {name: tensor shaped like the parameter} in ``acc_dtype``.
    ``progress`` is an optional tqdm bar advanced by the batch size. ``checkpoint`` (scoring/progress.py)
    resumes from saved partial sums, skipping the batches they cover, and saves them as the loop goes.
    """
    names, tensors = list(params), list(params.values())
    acc = zeros_like_params(params, acc_dtype)
    start, saved = checkpoint.load() if checkpoint is not None else (0, {})
    if saved:
        acc = restore(saved, "", acc)
    device = tensors[0].device
    for done, batch in remaining(batches, start, progress):
        losses = per_example_loss(model, model_inputs(batch, device))  # [B]
        check_finite(losses, batch)
        grads = torch.autograd.grad(losses.sum(), tensors, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                acc[n] += g.to(acc_dtype)
        if progress is not None:
            progress.update(len(losses))
        if checkpoint is not None:
            checkpoint.after_batch(done, lambda: acc)
    return acc


def target_gradient(model: torch.nn.Module, batches: list[Batch], params: Mapping[str, torch.nn.Parameter],
                    acc_dtype: torch.dtype = torch.float32, progress: object | None = None) -> ParamDict:
    """v_new = mean over the target set V of g_q = ∇ mean_q l(z_q; θ) (METHOD.md §3)."""
    Q = sum(int(b["input_ids"].shape[0]) for b in batches)
    if Q == 0:
        raise ConfigError("the target set is empty: v_new needs at least one target example")
    G = gradient_sum(model, batches, params, acc_dtype, progress)
    return {n: g / Q for n, g in G.items()}


def combine_u(v_new: Mapping[str, torch.Tensor], v_prior: Mapping[str, torch.Tensor] | None,
              G: Mapping[str, torch.Tensor] | None, c: Mapping[str, torch.Tensor] | None, eta: float,
              lambda_new: float, lambda_prior: float, order: int) -> tuple[ParamDict, ParamDict, dict[str, float]]:
    """u and v of METHOD.md §4.

        v = λ_new v_new + λ_prior v_prior
        u = η v − ½ η² (c ⊙ G)     (order 2; needs G and c)
        u = η v                     (order 1)

    ``v_prior`` may be None (λ_prior = 0: the anchor pass was skipped). ``c`` is Adam's raw exp_avg_sq;
    a parameter missing from ``c`` has no curvature estimate and gets a zero second-order term (logged).
    Returns (u, v, term_norms) with term_norms = l2 norms of η·λ_new·v_new, η·λ_prior·v_prior,
    ½η²·c⊙G and of u itself, as floats (so users see which terms matter at their scale).
    """
    if order not in (1, 2):
        raise ConfigError(f"--order must be 1 or 2, got {order}")
    if order == 2 and (G is None or c is None):
        raise ConfigError("order 2 needs both G and the curvature c (Adam exp_avg_sq from the warm-up)")
    u: ParamDict = {}
    v: ParamDict = {}
    sq = {"eta_lambda_new_v_new": 0.0, "eta_lambda_prior_v_prior": 0.0, "half_eta2_c_G": 0.0, "u": 0.0}
    missing_c = []
    for n, vn in v_new.items():
        t_new = lambda_new * vn
        t_prior = lambda_prior * v_prior[n] if (v_prior is not None and lambda_prior) else torch.zeros_like(vn)
        v[n] = t_new + t_prior
        u[n] = eta * v[n]
        sq["eta_lambda_new_v_new"] += float((eta * t_new).double().pow(2).sum())
        sq["eta_lambda_prior_v_prior"] += float((eta * t_prior).double().pow(2).sum())
        if order == 2:
            if n not in c:  # type: ignore[operator]
                missing_c.append(n)
                continue
            second = 0.5 * eta**2 * c[n].to(u[n]) * G[n].to(u[n])  # type: ignore[index]
            u[n] = u[n] - second
            sq["half_eta2_c_G"] += float(second.double().pow(2).sum())
    for un in u.values():
        sq["u"] += float(un.double().pow(2).sum())
    if missing_c:
        log.warning("no curvature for %d parameter(s) (e.g. %s): their second-order term is 0", len(missing_c),
                    missing_c[0])
    return u, v, {k: s**0.5 for k, s in sq.items()}


def surrogate_improvement(v: Mapping[str, torch.Tensor], c: Mapping[str, torch.Tensor] | None,
                          G_S: Mapping[str, torch.Tensor], mask_bool_dict: Mapping[str, torch.Tensor],
                          eta: float) -> float:
    """I(m, S) = η vᵀ(m ⊙ G_S) − ½ η² Σ_j m_j c_j (G_S)_j²   (METHOD.md §3), in float64.

    ``mask_bool_dict`` maps parameter names to bool masks shaped like the parameter; a name absent from it
    is entirely unselected. ``c`` None means no curvature (first-order surrogate). Names absent from
    ``v``/``G_S`` contribute nothing.
    """
    total = 0.0
    for n, m in mask_bool_dict.items():
        if n not in v or n not in G_S:
            continue
        mf = m.to(device=G_S[n].device, dtype=torch.float64)
        g = G_S[n].double() * mf
        total += eta * float((v[n].double().to(g.device) * g).sum())
        if c is not None and n in c:
            total -= 0.5 * eta**2 * float((c[n].double().to(g.device) * g * g).sum())
    return total


def param_scores(u: Mapping[str, torch.Tensor], G: Mapping[str, torch.Tensor]) -> ParamDict:
    """φ_param = u ⊙ G per parameter (column sums of the interaction matrix M, METHOD.md §4), float32."""
    return {n: (u[n].double() * G[n].double()).float() for n in u}
