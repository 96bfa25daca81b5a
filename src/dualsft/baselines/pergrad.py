"""Per-example weight gradients of linear layers, one layer at a time, inside ONE batched backward.

For a linear map o_t = W a_t + b (nn.Linear, W [out, in]) the gradient of example n's loss is

    g_n(W) = Σ_t e_{n,t} a_{n,t}ᵀ      e = ∂l_n/∂o  [B, T, out],  a = layer input [B, T, in]
    g_n(b) = Σ_t e_{n,t}

(GPT-2's Conv1D stores W as [in, out]: g_n(W) = Σ_t a_{n,t} e_{n,t}ᵀ). An identity autograd node on the
layer output saves a and, in the backward, receives e (rows of ∂(Σ_n l_n)/∂o are exactly ∂l_n/∂o because
examples do not interact in eval mode) and hands ``einsum('bto,bti->boi', e, a)`` [B, *W.shape] to a
callback, which must reduce it (precondition + project) before the next layer's arrives: at most one layer's
per-example gradients exist at a time. The capture is scoring/ghost.py's ``tapped`` (the same per-layer
capture as the ghost row scorer). The weights are frozen for the pass (embedding outputs become the differentiable leaves), so
the backward computes activation gradients only, never a dense weight gradient.

Covered: nn.Linear and transformers' Conv1D whose weight is not shared with an embedding (a tied LM head's
gradient also has an embedding part that is not covered here). Embeddings, norms and the LM head are
excluded: see docs/baselines.md. ``per_example_grads_loop`` is the slow oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from dualsft.losses import per_example_loss
from dualsft.scoring.ghost import (
    Tap,
    _conv1d_type,  # noqa: F401  (re-exported: baselines/params.py imports it here)
    frozen_with_leaf_embeddings,
    tapped,
)
from dualsft.scoring.layers import Layer, linear_layers  # noqa: F401  (re-exported: less.py, bench.py import them here)

Batch = dict[str, torch.Tensor]
# callback(parameter name, per-example gradients [B, *param.shape])
GradCallback = Callable[[str, torch.Tensor], None]


def layer_grads(layer: Layer, a: torch.Tensor, e: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, per-example gradient [B, *param.shape]) for the weight and bias of ``layer``.

    a: layer input [B, ..., in]; e: ∂(Σ_n l_n)/∂output [B, ..., out].
    """
    B = e.shape[0]
    a = a.reshape(B, -1, a.shape[-1]).to(e.dtype)
    e = e.reshape(B, -1, e.shape[-1])
    if layer.weight is not None:
        spec = "bto,bti->boi" if layer.kind == "linear" else "bto,bti->bio"
        yield layer.weight, torch.einsum(spec, e, a)
    if layer.bias is not None:
        yield layer.bias, e.sum(1)


def backward_per_example(model: torch.nn.Module, inputs: Batch, layers: Sequence[Layer],
                         callback: GradCallback) -> torch.Tensor:
    """One forward + one backward of Σ_n l_n over the batch; for every layer in ``layers`` the callback
    receives each parameter's per-example gradients [B, *shape] during the backward. Returns l [B] (detached).

    Raises ConfigError if a featurised layer runs twice in one forward (its per-example gradient would
    arrive in parts, and the callback's preconditioning is nonlinear); the check counts the gradients that
    arrive in the backward, so a gradient-checkpointing recompute (models.checkpointed_layers) does not trip it.
    """
    taps = [Tap(ly.module, _reporter(ly, callback), once=True, name=ly.module_name) for ly in layers]
    with frozen_with_leaf_embeddings(model) as leaves, tapped(taps, int(inputs["input_ids"].shape[0])):
        losses = per_example_loss(model, inputs)  # [B]
        if leaves:
            torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
    return losses.detach()


def _reporter(layer: Layer, callback: GradCallback) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """Tap callback: (a, e) of ``layer`` -> callback(name, per-example gradient) for its weight and bias."""
    def report(a: torch.Tensor, e: torch.Tensor) -> None:
        for name, g in layer_grads(layer, a, e):
            callback(name, g)

    return report


def per_example_grads_loop(model: torch.nn.Module, inputs: Batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """THE ORACLE: one backward per example, each example alone with its padding removed.

    Returns {name: [B, *param.shape]} for the named parameters. O(B) backward passes: for tests only.
    """
    params = dict(model.named_parameters())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(inputs["input_ids"].shape[0]):
        keep = inputs["attention_mask"][i].bool()
        one = {k: inputs[k][i][keep].unsqueeze(0) for k in ("input_ids", "attention_mask", "labels")}
        loss = per_example_loss(model, one).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            out[n].append(torch.zeros_like(params[n]) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}
