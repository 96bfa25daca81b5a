"""Row scores φ_data[n] = ⟨u, g_n⟩ for every pool example without forming any g_n (docs/method.md §4).

    row_scores(model, batches, u, method="jvp") -> (scores [N] float64, losses [N] float64)
        in batch order (map to examples with each batch's "index"), on CPU.
    score_pool(model, batches, u, method, grad_sum=False, ...) -> (scores, losses, G or None)
        the first-order single pass: with ``grad_sum=True`` the same pass also returns G = Σ_n g_n.
    row_step(model, u, method, grad_sum) -> the per-batch function of those passes (scoring/passes.py).

Methods (all exact for every trainable parameter the model has):
- "jvp": one batched forward-mode JVP of the per-example loss vector along the tangent u
  (torch.func.jvp over functional_call). Generic: every parameter type, tied weights included. Needs
  attention kernels with a forward-AD rule: eager attention, or SDPA's math backend (enforced here).
  With ``grad_sum`` the forward carries dual numbers and an ordinary backward of the primal gives G.
- "ghost": backward hooks with per-example inner products (see ghost.py). Linear, GPT-2 Conv1D,
  Embedding (incl. tied) and elementwise-affine norms; anything else raises (use jvp).
- "exact": one backward per example, each example alone (no padding): THE ORACLE the fast paths are
  tested against. O(N) backward passes; use it to check, not to score large pools.
Padding never changes a score: padded positions carry label -100, so their loss gradient is zero, and
with right padding the causal mask keeps them out of every real token's computation.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch.autograd import forward_ad as fwAD
from torch.func import functional_call

from dualsft.distributed import is_sharded
from dualsft.errors import ConfigError
from dualsft.losses import per_example_loss, per_example_loss_from_logits
from dualsft.scoring.ghost import GhostScorer
from dualsft.scoring.passes import BatchOut, Step, run_pass
from dualsft.scoring.progress import PassCheckpoint
from dualsft.scoring.stats import check_finite, model_inputs, param_grads, trainable_params, zeros_like_params

METHODS = ("jvp", "ghost", "exact")
Batch = dict[str, torch.Tensor]
ParamDict = dict[str, torch.Tensor]
# (scores [B], losses [B], gradient of Σ_B l_n per parameter or None) of one batch
RowOut = tuple[torch.Tensor, torch.Tensor, ParamDict | None]


def row_scores(model: torch.nn.Module, batches: list[Batch], u: Mapping[str, torch.Tensor],
               method: str = "jvp") -> tuple[torch.Tensor, torch.Tensor]:
    """φ_data[n] = ⟨u, g_n⟩ and l_n for every example of ``batches``, in batch order.

    ``u`` maps trainable parameter names (named_parameters, tied once) to tensors shaped like them; a
    trainable parameter absent from ``u`` counts as u = 0 there. Returns (scores [N], losses [N]),
    float64, CPU. Raises NonFiniteLossError (with example indices) on a NaN/inf loss.
    """
    scores, losses, _ = score_pool(model, batches, u, method=method, grad_sum=False)
    return scores, losses


def score_pool(model: torch.nn.Module, batches: list[Batch], u: Mapping[str, torch.Tensor], method: str = "ghost",
               grad_sum: bool = False, acc_dtype: torch.dtype = torch.float32,
               progress: Any | None = None,
               checkpoint: PassCheckpoint | None = None) -> tuple[torch.Tensor, torch.Tensor, ParamDict | None]:
    """One pass over the pool: (φ_data [N], l [N], G or None). ``grad_sum=True`` also accumulates
    G = Σ_n g_n (in ``acc_dtype``) from the same backward: the first-order single pass.
    ``checkpoint`` (scoring/progress.py) resumes from the saved row chunks (and partial G), skipping the
    batches they cover, and saves them every few batches."""
    step = row_step(model, u, method, grad_sum)
    res = run_pass(batches, step, row_accumulators(model, grad_sum, acc_dtype), progress, checkpoint)
    empty = torch.zeros(0, dtype=torch.float64)
    return res.rows.get("scores", empty), res.rows.get("losses", empty), res.sums if grad_sum else None


def row_accumulators(model: torch.nn.Module, grad_sum: bool, acc_dtype: torch.dtype = torch.float32) -> ParamDict:
    """The sums of a row pass: G's zeros (``grad_sum``: the first-order single pass), else none."""
    return zeros_like_params(trainable_params(model), acc_dtype) if grad_sum else {}


def row_step(model: torch.nn.Module, u: Mapping[str, torch.Tensor], method: str = "ghost",
             grad_sum: bool = False, norms: bool = False) -> Step:
    """The per-batch function of a row pass: rows "scores" = ⟨u, g_n⟩ and "losses" = l_n ([B] float64)
    and, with ``grad_sum``, the batch's gradient sum added to G. ``norms``: also the row "sq_norms" =
    ‖g_n‖² over every trainable parameter (exact; ghost: norms.py's Gram identities, exact: the oracle;
    jvp has none and raises)."""
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {METHODS}, got {method!r}")
    if norms and method == "jvp":
        raise ConfigError("per-example gradient norms (--data-score cosine, --target-gradient normalized) need "
                          "--method ghost or exact, not jvp")
    params = trainable_params(model)
    sharded = any(is_sharded(p) for p in params.values())
    if sharded and method != "ghost":
        raise ConfigError(f"--sharding fsdp scores rows with --method ghost only, not {method!r}")
    u = u if sharded else {n: t for n, t in u.items() if n in params}  # sharded: the gathered slots (scoring/sharded.py)
    device = next(iter(params.values())).device
    # sharded: weights keep their gradients (FSDP's reduce-scatter expects them; param_grads drops them)
    ghost = GhostScorer(model, u, weight_grads=grad_sum or sharded, norms=norms) if method == "ghost" else None
    batch_fn = {"jvp": _jvp_batch, "ghost": _ghost_batch, "exact": _exact_batch}[method]

    def step(batch: Batch) -> BatchOut:
        inputs = model_inputs(batch, device)
        sq: list[torch.Tensor] = []
        scores, losses, grads = batch_fn(model, inputs, params, u, grad_sum, ghost=ghost, sq_norms=sq if norms else None)
        check_finite(losses, batch)
        rows = {"scores": scores.detach().double(), "losses": losses.detach().double()}
        if norms:
            rows["sq_norms"] = sq[0].detach().double()
        return BatchOut(int(inputs["input_ids"].shape[0]), sums=grads or {}, rows=rows)

    return step


def _tangents(params: Mapping[str, torch.Tensor], u: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """u as tangents: same dtype/device as each parameter, zeros where u has no entry."""
    return {n: (u[n].to(device=p.device, dtype=p.dtype) if n in u else torch.zeros_like(p)) for n, p in params.items()}


def _math_sdpa() -> Any:
    """SDPA's fused CPU/CUDA kernels have no forward-AD rule; the math backend does (eager needs nothing)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover
        return nullcontext()


def _jvp_batch(model: torch.nn.Module, inputs: Batch, params: Mapping[str, torch.Tensor],
               u: Mapping[str, torch.Tensor], grad_sum: bool, **_: Any) -> RowOut:
    """Directional derivative of the loss vector [B] along u = (⟨u, g_n⟩)_n, by forward-mode AD."""
    tangents = _tangents(params, u)
    kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
    with _math_sdpa():
        if not grad_sum:
            primals = {n: p.detach() for n, p in params.items()}

            def losses_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
                return per_example_loss_from_logits(functional_call(model, p, (), kwargs).logits, inputs["labels"])

            with torch.no_grad():
                losses, scores = torch.func.jvp(losses_of, (primals,), (tangents,))
            return scores, losses, None
        # first order, one pass: dual numbers carry the tangent, and the primal graph gives G by backward
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p, tangents[n]) for n, p in params.items()}
            logits = functional_call(model, duals, (), kwargs).logits
            primal, tangent = fwAD.unpack_dual(per_example_loss_from_logits(logits, inputs["labels"]))
            tangent = tangent.detach()
        # backward outside the dual level: backward kernels (silu_backward, ...) have no forward-AD rule
        return tangent, primal, param_grads(params, primal.sum())


def _ghost_batch(model: torch.nn.Module, inputs: Batch, params: Mapping[str, torch.Tensor],
                 u: Mapping[str, torch.Tensor], grad_sum: bool, ghost: GhostScorer | None = None,
                 sq_norms: list[torch.Tensor] | None = None, **_: Any) -> RowOut:
    """Per-example inner products accumulated by hooks inside one batched backward (ghost.py)."""
    assert ghost is not None
    ghost.reset(int(inputs["input_ids"].shape[0]), inputs["input_ids"].device)
    grads = None
    with ghost.installed(model):
        losses = per_example_loss(model, inputs)
        if ghost.weight_grads:
            grads = param_grads(params, losses.sum())
        else:
            losses.sum().backward()  # parameters are frozen here: activation gradients only
    assert ghost.scores is not None
    if sq_norms is not None:
        sq_norms.append(ghost.squared_norms())
    return ghost.scores, losses, grads if grad_sum else None


def _exact_batch(model: torch.nn.Module, inputs: Batch, params: Mapping[str, torch.Tensor],
                 u: Mapping[str, torch.Tensor], grad_sum: bool, sq_norms: list[torch.Tensor] | None = None,
                 **_: Any) -> RowOut:
    """THE ORACLE: each example alone (padding cut off), one backward each, ⟨u, g_n⟩ summed in float64
    (and, with ``grad_sum``, the examples' gradients summed in the parameters' dtype; with ``sq_norms``,
    ‖g_n‖² in float64 appended to it)."""
    scores, losses, sq = [], [], []
    G: ParamDict | None = {} if grad_sum else None
    for b in range(inputs["input_ids"].shape[0]):
        keep = inputs["attention_mask"][b].bool()  # real tokens are contiguous (left or right padding)
        one = {k: v[b : b + 1, keep] for k, v in inputs.items()}
        loss = per_example_loss(model, one)[0]
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        s = torch.zeros((), dtype=torch.float64, device=loss.device)
        zero = torch.zeros((), dtype=torch.float64, device=loss.device)
        sq.append(sum((g.double().pow(2).sum() for g in grads if g is not None), zero))
        for n, g in zip(params, grads):
            if g is None:
                continue
            if n in u:
                s = s + (u[n].to(g.device).double() * g.double()).sum()
            if G is not None:
                G[n] = G[n] + g if n in G else g
        scores.append(s)
        losses.append(loss.detach())
    if sq_norms is not None:
        sq_norms.append(torch.stack(sq))
    return torch.stack(scores), torch.stack(losses), G
