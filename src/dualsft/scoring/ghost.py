"""Ghost inner products: ⟨u, g_n⟩ for every example n inside ONE batched backward (docs/method.md §4).

The per-layer capture ``tapped`` (shared with the LESS baseline's per-example gradients, baselines/pergrad.py):
for each tapped module a forward hook passes the output through an identity autograd node (``_Capture``)
that saves the module input a; when the backward reaches it, the tap receives a and e = ∂(Σ_n l_n)/∂output,
whose rows for example n are exactly ∂l_n/∂output (examples do not interact in eval mode). Because a is a
saved tensor of the graph, ``--gradient-checkpointing`` (models.checkpointed_layers) drops and recomputes
it with the layer's other activations. The per-example inner product
with the direction U (u restricted to that parameter) is then, summed over tokens t:

    Linear  (o = a Wᵀ + b, W [out, in]):   Σ_t e_tᵀ U a_t  +  Σ_t e_t·u_b
    Conv1D  (GPT-2, o = a W + b, W [in, out]): Σ_t a_tᵀ U e_t  +  Σ_t e_t·u_b
    Embedding (o = W[x]):                  Σ_t ⟨U[x_t], e_t⟩     (x_t = padding_idx excluded: no gradient)
    elementwise-affine norm (o = x̂ ⊙ w + b):  Σ_t Σ_i u_i e_{t,i} x̂_{t,i} + Σ_t e_t·u_b
        with x̂ recomputed by calling the module with w = 1, b = 0 (RMSNorm, LayerNorm, ...); the
        affine form is verified on the first call and a module that is not affine raises.
A tied weight (embedding + LM head) contributes from both modules to the same row score.
Any other module owning a trainable parameter raises ConfigError (use --method jvp, which is generic).

Cost: one extra matmul of the forward's size per linear layer (e @ U or a @ Uᵀ, whichever output is
smaller). With ``weight_grads=False`` the parameters are frozen for the pass and the embedding outputs
made differentiable, so the backward computes activation gradients only (no weight gradients): that is
the second-order row pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from dualsft.errors import ConfigError
from dualsft.scoring.norms import SquaredNorms, bias_factor, weight_factor


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return None
    return Conv1D


def module_kind(module: torch.nn.Module) -> str:
    """'linear' | 'conv1d' | 'embedding' | 'affine_norm' | 'other' for a module that owns parameters."""
    conv1d = _conv1d_type()
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    own = dict(module.named_parameters(recurse=False))
    if own and set(own) <= {"weight", "bias"} and all(p.dim() == 1 for p in own.values()) and "weight" in own:
        return "affine_norm"
    return "other"


@dataclass(frozen=True)
class Tap:
    """One module whose (input a, output gradient e) the backward hands to ``on_grad(a, e)``.

    ``prepare(a, y)`` (optional) maps the input and the detached output to what ``on_grad`` receives as a,
    at forward time; ``once`` refuses a module whose gradient arrives twice in one backward, i.e. one used
    twice in one forward (``name`` says which)."""

    module: torch.nn.Module
    on_grad: Callable[[torch.Tensor, torch.Tensor], None]
    prepare: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    once: bool = False
    name: str = ""


class _Capture(torch.autograd.Function):
    """Identity on a module output y that SAVES the module input a (ctx.save_for_backward) and, in the
    backward, hands (a, e = ∂L/∂y) to ``on_grad`` before passing e on unchanged.

    Saved rather than held by a Python closure, a is an activation like any other: without checkpointing it
    lives until the backward (as the closure did); under non-reentrant gradient checkpointing
    (models.checkpointed_layers) it is discarded after the forward and recomputed in the backward. The
    recompute runs the forward hooks again, which build a second _Capture on the recomputed output: that one
    only saves the recomputed a for the original node, and its own backward never runs."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, a: torch.Tensor, on_grad: Callable) -> torch.Tensor:
        ctx.save_for_backward(a)
        ctx.on_grad = on_grad
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, e: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (a,) = ctx.saved_tensors
        ctx.on_grad(a, e.detach())
        return e, None, None


@contextmanager
def tapped(taps: Sequence[Tap], batch_size: int) -> Iterator[None]:
    """Install the capture of ``taps`` for one forward + backward of a batch of ``batch_size``.

    a: module input [B, ..., in] (detached); e: ∂(Σ_n l_n)/∂output [B, ..., out]. An output shared across
    the batch ([1, ...], GPT-2's position embedding of [1, T] position ids) is expanded to B copies first:
    broadcasting would otherwise SUM the examples' gradients. A forward hook wraps each output in
    ``_Capture`` (so gradient checkpointing recomputes a like any activation). ``once`` counts the gradients
    that ARRIVE per module, not forward calls: a recompute calls the hooks again, but only the original
    forward's captures are on the backward's path."""
    arrivals: dict[int, int] = {}

    def hook_for(tap: Tap) -> Callable:
        def on_grad(a: torch.Tensor, e: torch.Tensor) -> None:
            arrivals[id(tap.module)] = arrivals.get(id(tap.module), 0) + 1
            if tap.once and arrivals[id(tap.module)] > 1:
                raise ConfigError(f"layer {tap.name!r} runs twice in one forward; per-example gradient "
                                  "featurisation needs each layer used once (exclude it)")
            tap.on_grad(a, e)

        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not output.requires_grad:  # nothing upstream needs a gradient: no per-example term either
                return None
            a = inputs[0].detach()
            if output.shape[0] == 1 < batch_size:
                output = output.expand(batch_size, *output.shape[1:])
                a = a.expand(batch_size, *a.shape[1:])
            if tap.prepare is not None:
                a = tap.prepare(a, output.detach())
            return _Capture.apply(output, a, on_grad)

        return hook

    handles = [tap.module.register_forward_hook(hook_for(tap)) for tap in taps]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class GhostScorer:
    """Accumulates φ_data = ⟨u, g_n⟩ per example of the current batch while hooks are installed.

    Use: ``with scorer.installed(model): loss.sum().backward()`` then read ``scorer.scores`` [B] (float64).
    ``u`` maps parameter names (as in named_parameters) to directions shaped like the parameters.
    """

    def __init__(self, model: torch.nn.Module, u: Mapping[str, torch.Tensor], weight_grads: bool = True,
                 norms: bool = False):
        self.model = model
        self.weight_grads = weight_grads
        self.compute_dtype = _compute_dtype(next(model.parameters()).dtype)
        names = {id(p): n for n, p in model.named_parameters()}  # tied weights: their first name
        # a plain dict: cast once to the compute dtype on the parameter's device. Any other Mapping is read at
        # hook time (FSDP2: a layer's u is whole only while the layer is gathered, scoring/sharded.py)
        self.u: Mapping[str, torch.Tensor] = u
        if isinstance(u, dict):
            params = dict(model.named_parameters())
            self.u = {n: t.to(device=params[n].device, dtype=self.compute_dtype) for n, t in u.items() if n in params}
        # ``norms``: also ‖g_n‖² over EVERY trainable parameter (norms.py), whether u covers it or not
        self.tapped = {n for n in names.values() if n in self.u} | (
            {names[id(p)] for p in model.parameters() if p.requires_grad} if norms else set())
        # (id(module), "weight" | "bias") -> parameter name: keys that survive FSDP2 swapping the tensors
        self.param_name: dict[tuple[int, str], str] = {}
        self.modules: list[tuple[str, torch.nn.Module, str]] = []
        uses: dict[str, int] = {}
        for mname, mod in model.named_modules():
            own = {a: names[id(p)] for a, p in mod.named_parameters(recurse=False) if names[id(p)] in self.tapped}
            if not own:
                continue
            kind = module_kind(mod)
            if kind == "other":
                raise ConfigError(f"--method ghost has no rule for module {mname!r} ({type(mod).__name__}) that owns "
                                  f"{list(own.values())}; use --method jvp (exact for every parameter type)")
            self.modules.append((mname, mod, kind))
            for a, n in own.items():
                self.param_name[(id(mod), a)] = n
                uses[n] = uses.get(n, 0) + 1
        missing = sorted(self.tapped - set(uses))
        if missing:
            raise ConfigError(f"--method ghost found no module owning {missing[:3]}; use --method jvp")
        self.norms = SquaredNorms(uses) if norms else None
        self.scores: torch.Tensor | None = None
        self._verified: set[int] = set()

    def reset(self, batch_size: int, device: torch.device) -> None:
        """Start a new batch: zero the per-example accumulator."""
        self.scores = torch.zeros(batch_size, dtype=torch.float64, device=device)
        if self.norms is not None:
            self.norms.reset(batch_size, device)

    def squared_norms(self) -> torch.Tensor:
        """‖g_n‖² [B] (float64) of the batch just backpropagated (built with ``norms=True``)."""
        assert self.norms is not None, "built without norms=True"
        return self.norms.finish()

    @contextmanager
    def installed(self, model: torch.nn.Module) -> Any:
        """Install the hooks (and, for ``weight_grads=False``, freeze the parameters) for one pass."""
        assert self.scores is not None, "call reset(batch_size, device) first"
        with contextlib.ExitStack() as stack:
            if not self.weight_grads:
                # registered first: a forward hook's returned output is what the later hooks see
                stack.enter_context(frozen_with_leaf_embeddings(model))
            stack.enter_context(tapped([self._tap(mod, kind) for _, mod, kind in self.modules], self.scores.shape[0]))
            yield self

    def _tap(self, module: torch.nn.Module, kind: str) -> Tap:
        """The capture of one module: x̂ instead of x for a norm, then ⟨U, g_n(module)⟩ per example."""
        def on_grad(x: torch.Tensor, e: torch.Tensor) -> None:
            self._accumulate(module, kind, x, e)

        def normalise(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return _normalised(module, x, y, self._verified)

        return Tap(module, on_grad, normalise if kind == "affine_norm" else None)

    def _accumulate(self, mod: torch.nn.Module, kind: str, x: torch.Tensor, e: torch.Tensor) -> None:
        """Add ⟨U, g_n(module)⟩ for every example n of the batch to self.scores (and g_n's factors to the norms)."""
        e = e.to(self.compute_dtype)
        B = e.shape[0]
        total = torch.zeros(B, dtype=torch.float64, device=e.device)
        w_name, b_name = self.param_name.get((id(mod), "weight")), self.param_name.get((id(mod), "bias"))
        W, Ub = self._direction(w_name), self._direction(b_name)
        if W is not None:
            total += _weight_term(kind, mod, W, x, e).double()
        if Ub is not None:
            total += (e.reshape(B, -1, e.shape[-1]).sum(1) @ Ub).double()
        self.scores += total
        if self.norms is not None:
            if w_name is not None:
                self.norms.add(w_name, weight_factor(kind, mod, x, e))
            if b_name is not None:
                self.norms.add(b_name, bias_factor(e))

    def _direction(self, name: str | None) -> torch.Tensor | None:
        """U for the named parameter in the compute dtype (None: no direction there)."""
        if name is None or name not in self.u:
            return None
        return self.u[name].to(self.compute_dtype)


@contextlib.contextmanager
def frozen_with_leaf_embeddings(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Freeze every parameter but keep gradients flowing to activations: each embedding output becomes a
    leaf that requires grad (collected in the yielded list). The backward then computes only activation
    gradients, which is all the per-example inner products need. Parameters are unfrozen on exit."""
    leaves: list[torch.Tensor] = []

    def make_leaf(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    handles = [m.register_forward_hook(make_leaf) for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    try:
        yield leaves
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Inner products in at least float32 (bf16 sums over T·d terms lose everything)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _weight_term(kind: str, mod: torch.nn.Module, U: torch.Tensor, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Σ_t of the per-token inner product of U with the weight gradient; x, e [B, ..., ·] -> [B]."""
    B = e.shape[0]
    if kind == "embedding":
        ids = x.reshape(B, -1)  # [B, T]
        rows = U[ids]  # [B, T, H]
        if mod.padding_idx is not None:  # nn.Embedding gives the padding row no gradient
            rows = rows * ids.ne(mod.padding_idx).unsqueeze(-1).to(rows.dtype)
        return (rows * e.reshape(B, ids.shape[1], -1)).sum((1, 2))
    x = x.to(e.dtype).reshape(B, -1, x.shape[-1])  # [B, T, in]
    e = e.reshape(B, -1, e.shape[-1])  # [B, T, out]
    if kind == "affine_norm":
        return (e * x * U).sum((1, 2))
    if kind == "conv1d":
        U = U.t()  # GPT-2 Conv1D stores W as [in, out]; use the Linear layout [out, in]
    # Σ_t e_tᵀ U a_t: multiply on the side with the smaller result (LM head: e @ U is [B, T, hidden])
    if U.shape[0] >= U.shape[1]:
        return ((e @ U) * x).sum((1, 2))
    return ((x @ U.t()) * e).sum((1, 2))


def _normalised(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, verified: set[int]) -> torch.Tensor:
    """x̂ = module(x) with weight 1 and bias 0; on first use check y == x̂ ⊙ w + b (else the rule is wrong)."""
    own = dict(module.named_parameters(recurse=False))
    unit = {"weight": torch.ones_like(own["weight"])}
    if "bias" in own:
        unit["bias"] = torch.zeros_like(own["bias"])
    with torch.no_grad():
        xhat = functional_call(module, unit, (x,))
        # a non-finite output cannot verify anything; the loss check then names the examples
        if id(module) not in verified and bool(torch.isfinite(y).all()):
            rebuilt = xhat * own["weight"] + (own["bias"] if "bias" in own else 0)
            if not torch.allclose(rebuilt, y, rtol=1e-3, atol=1e-5 * (1 + y.abs().max().item())):
                raise ConfigError(f"--method ghost: {type(module).__name__} is not of the form x̂ ⊙ weight + bias; "
                                  "use --method jvp")
            verified.add(id(module))
    return xhat
