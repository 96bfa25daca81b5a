"""Gradient statistics of DualSFT (docs/method.md §3-§4): G = Σ_n g_n and v_new = mean_V g_q.

Every per-parameter statistic is a ``dict[str, Tensor]`` keyed by the name ``model.named_parameters()``
gives (tied weights appear once, under their first name), shaped like the parameter, and accumulated in
float32 by default (``acc_dtype=torch.float64`` for tests). Accumulators live on the parameter's device.
The passes run on scoring/passes.py; the maths that combines the statistics (u, φ_param, I(m, S)) is
dualsft/method.py (``combine_u``, ``param_scores`` and ``surrogate_improvement`` are re-exported here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from dualsft.distributed import is_sharded, local_tensor
from dualsft.errors import ConfigError, NonFiniteLossError
from dualsft.losses import per_example_loss
from dualsft.method import combine_u, param_scores, surrogate_improvement  # noqa: F401  (re-exported)
from dualsft.scoring.passes import BatchOut, Step, run_pass
from dualsft.scoring.progress import PassCheckpoint

Batch = dict[str, torch.Tensor]
ParamDict = dict[str, torch.Tensor]


def trainable_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters with ``requires_grad``, in ``named_parameters()`` order; a tied weight appears ONCE,
    under the name ``named_parameters()`` gives it (e.g. ``model.embed_tokens.weight``, not ``lm_head.weight``)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def zeros_like_params(params: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> ParamDict:
    """One zero accumulator per parameter, shaped like it (like this rank's shard of an FSDP2-sharded one),
    on its device, in ``dtype``."""
    return {n: torch.zeros(local_tensor(p).shape, dtype=dtype, device=p.device) for n, p in params.items()}


def param_grads(params: Mapping[str, torch.Tensor], total: torch.Tensor) -> ParamDict:
    """∇ total per parameter from one backward (tied weights summed by autograd; unreached ones left out).

    FSDP2-sharded parameters (``--sharding fsdp``) take an ordinary ``backward``: FSDP reduce-scatters each
    layer's gradient, so ``p.grad`` holds this rank's rows of the gradient SUMMED over every rank's batch
    (docs/scaling.md §4b). That local shard is returned and ``p.grad`` cleared. Every rank must call it."""
    tensors = list(params.values())
    if not any(is_sharded(p) for p in tensors):
        grads = torch.autograd.grad(total, tensors, allow_unused=True)
        return {n: g for n, g in zip(params, grads) if g is not None}
    total.backward()
    out = {}
    for n, p in params.items():
        if p.grad is not None:
            out[n] = local_tensor(p.grad)
            p.grad = None
    return out


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


def gradient_step(model: torch.nn.Module, params: Mapping[str, torch.nn.Parameter]) -> Step:
    """The per-batch function of a G pass: g_B = ∇_θ Σ_{n∈B} l_n(θ) for ``params`` (one ordinary backward of
    the summed loss; a parameter the loss does not reach adds nothing)."""
    device = next(iter(params.values())).device

    def step(batch: Batch) -> BatchOut:
        losses = per_example_loss(model, model_inputs(batch, device))  # [B]
        check_finite(losses, batch)
        return BatchOut(len(losses), sums=param_grads(params, losses.sum()))

    return step


def weighted_gradient_step(model: torch.nn.Module, params: Mapping[str, torch.nn.Parameter],
                           weights: Mapping[int, float]) -> Step:
    """The per-batch function of a weighted pass: ∇_θ Σ_{n∈B} w_n l_n(θ), ``weights`` keyed by the examples'
    stable index (the normalized v_new, docs/method.md §4 "Scoring variants"): one summed-loss backward."""
    device = next(iter(params.values())).device

    def step(batch: Batch) -> BatchOut:
        losses = per_example_loss(model, model_inputs(batch, device))  # [B]
        check_finite(losses, batch)
        w = torch.tensor([weights[int(i)] for i in batch["index"]], dtype=losses.dtype, device=losses.device)
        return BatchOut(len(losses), sums=param_grads(params, (w * losses).sum()))

    return step


def gradient_sum(model: torch.nn.Module, batches: Iterable[Batch], params: Mapping[str, torch.nn.Parameter],
                 acc_dtype: torch.dtype = torch.float32, progress: object | None = None,
                 checkpoint: PassCheckpoint | None = None) -> ParamDict:
    """G = Σ_n g_n = ∇_θ Σ_n l_n(θ) over every example of ``batches`` (docs/method.md §4: a SUM, not a mean).

    ``params`` are the tensors differentiated (see ``trainable_params``). Returns {name: tensor shaped like
    the parameter} in ``acc_dtype``. ``progress``: optional tqdm bar advanced by examples. ``checkpoint``
    (scoring/progress.py) resumes from saved partial sums, skipping the batches they cover, and saves them.
    """
    return run_pass(batches, gradient_step(model, params), zeros_like_params(params, acc_dtype), progress,
                    checkpoint).sums


def target_gradient(model: torch.nn.Module, batches: list[Batch], params: Mapping[str, torch.nn.Parameter],
                    acc_dtype: torch.dtype = torch.float32, progress: object | None = None) -> ParamDict:
    """v_new = mean over the target set V of g_q = ∇ mean_q l(z_q; θ) (docs/method.md §3)."""
    Q = sum(int(b["input_ids"].shape[0]) for b in batches)
    if Q == 0:
        raise ConfigError("the target set is empty: v_new needs at least one target example")
    G = gradient_sum(model, batches, params, acc_dtype, progress)
    return {n: g / Q for n, g in G.items()}
