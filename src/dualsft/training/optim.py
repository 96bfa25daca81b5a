"""Optimizers for restricted fine-tuning (docs/method.md §5 step 5, §7).

``SparseAdamW`` is the fast path and a ``torch.optim.Optimizer`` (so torch and transformers learning-rate
schedulers drive it, and ``state_dict``/``load_state_dict`` work): for each parameter p with k_p selected
entries (sorted flat indices ``index`` [k_p]) it holds only ``exp_avg``/``exp_avg_sq``/a gradient
accumulator [k_p] in float32 (float64 for float64 weights) and, when the weight is narrower than float32
(bf16/fp16), a float32 ``master`` copy [k_p]. For float32/float64 weights the weight's own entries are the
master (a copy would be identical). Parameters with no selected entry get ``requires_grad=False``:
autograd never computes their gradient. A partially selected tensor's dense gradient is gathered into
the accumulator by a post-accumulate-grad hook the moment autograd finishes it, and ``p.grad`` is dropped
at once, so about one dense gradient lives at a time. The update writes only the selected entries
(``index_put_``), so every other entry stays bit-identical to θ0.

``DenseAdamW`` wraps ``torch.optim.AdamW`` behind the same small interface; with a mask it is the
authors' approach (zero the gradient outside the mask) and the ORACLE that tests ``SparseAdamW``.

Memory per selected entry (bytes): exp_avg 4 + exp_avg_sq 4 + accumulator 4 + index 4 (int32)
(+ master 4 for bf16/fp16 weights), against 12 bytes per entry of EVERY tensor for dense AdamW
(grad 4 + exp_avg 4 + exp_avg_sq 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any, Protocol

import torch

from dualsft.errors import ArtifactError, ConfigError
from dualsft.selection.mask import indices_to_dense


@dataclass(frozen=True)
class AdamWHyper:
    """AdamW hyperparameters (decoupled weight decay, bias-corrected moments)."""

    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


class Updater(Protocol):
    """What the training loop needs from an optimizer (dense or sparse)."""

    param_groups: list[dict[str, Any]]  # the loop writes each step's lr into group["lr"]

    @property
    def named(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of every trained tensor."""
        ...

    def clip_grad_norm_(self, max_norm: float | None) -> float:
        """Norm of the trained entries' accumulated gradient before clipping; scales it to ``max_norm``
        when that is > 0 and the norm is finite."""
        ...

    def step(self) -> Any:
        """Apply one AdamW update with the accumulated gradient."""
        ...

    def zero_grad(self) -> None: ...

    def all_reduce_grads(self) -> None:
        """Sum the accumulated gradients across ranks (no-op in one process)."""
        ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def exp_avg_sq(self) -> dict[str, torch.Tensor]:
        """{name: raw second moment (no bias correction)} of every tensor stepped at least once."""
        ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def trainable_values(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_values(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def state_bytes(self) -> dict[str, int]: ...


def adamw_update_(values: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW step on flat vectors, in place, in the same operation order as ``torch.optim.AdamW``.

    Args:
        values: [k] weights (the master copy), updated in place.
        grad: [k] gradient of the mean loss.
        exp_avg, exp_avg_sq: [k] first/second moments, updated in place.
        step: 1-based step count (for bias correction).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay).
    """
    beta1, beta2 = betas
    values.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    values.addcdiv_(exp_avg, denom, value=-step_size)


def clip_coefficient(norm: torch.Tensor, max_grad_norm: float | None) -> float | None:
    """The factor ``torch.nn.utils.clip_grad_norm_`` would scale by (None when no clipping applies)."""
    if max_grad_norm is None or max_grad_norm <= 0:
        return None
    return min(1.0, max_grad_norm / (float(norm) + 1e-6))


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _named_pairs(params: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """A param group's "params" as (name, parameter) pairs; SparseAdamW needs the names to find the mask."""
    pairs = [params] if isinstance(params, torch.Tensor) else list(params)
    if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in pairs):
        raise ConfigError("SparseAdamW needs named parameters: pass model.named_parameters() (or param groups "
                          "whose 'params' are (name, parameter) pairs), so the mask's names can be matched")
    return pairs


class SparseAdamW(torch.optim.Optimizer):
    """AdamW whose state and master values exist only for the selected entries (see module docstring).

    Args:
        params: ``model.named_parameters()`` (tied weights once), or param groups (dicts) whose "params" are
            (name, parameter) pairs and which may set their own lr / betas / eps / weight_decay. Parameters
            without a selected entry are frozen (``requires_grad=False``) and left out of the groups.
        indices: {name: sorted flat indices [k_p]} of the selected entries; names absent are frozen.
        lr, betas, eps, weight_decay: AdamW defaults of every group (weight decay on the selected entries only).

    ``state[p]`` holds ``step`` (a float32 scalar, as in ``torch.optim.AdamW``), ``index`` [k_p] (int32 when
    p has < 2^31 entries), ``exp_avg`` and ``exp_avg_sq`` [k_p], and ``master`` [k_p] for narrow weights.
    Gradients never stay in ``p.grad`` (the hook folds them into [k_p] accumulators), so clip with this
    optimizer's ``clip_grad_norm_`` (over the selected entries), not ``torch.nn.utils.clip_grad_norm_``;
    and ``step`` consumes the accumulators, because ``model.zero_grad()`` (which ``transformers.Trainer``
    calls instead of the optimizer's) cannot reach them.
    """

    def __init__(self, params: Iterable[Any], indices: dict[str, torch.Tensor], lr: float = 2e-5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{**g, "params": _named_pairs(g["params"])} for g in groups]  # a generator is read once
        known = {name for g in groups for name, _ in g["params"]}
        unknown = sorted(set(indices) - known)
        if unknown:
            raise ArtifactError(f"mask names parameters this model does not have: {unknown[:5]}")
        # set before torch's __init__, which calls add_param_group for every group
        self._indices = indices
        self._acc: dict[torch.Tensor, torch.Tensor] = {}  # p -> [k_p] gradient accumulated since the last step
        self._has_grad: dict[torch.Tensor, bool] = {}
        self._handles: list[Any] = []
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the group's selected parameters (their state starts at zero); freeze the others."""
        selected = []
        for name, p in _named_pairs(param_group["params"]):
            idx = self._indices.get(name)
            if idx is None or idx.numel() == 0:
                p.requires_grad_(False)  # no selected entry: autograd never computes its gradient
            else:
                selected.append((name, p))
        if not selected:
            return
        super().add_param_group({**param_group, "params": selected})
        for name, p in selected:
            self._init_param(name, p, self._indices[name])

    # Where the entries live. Subclasses (training/sharded.py: FSDP2 shards) override these four:
    _hooked = True  # fold each gradient in a post-accumulate-grad hook (else from p.grad before the step)

    def _storage(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor whose flat view the [k] indices address (the parameter itself, or its gradient)."""
        return t

    def _local_index(self, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The mask's sorted flat indices of ``p`` as this optimizer addresses ``_storage(p)``."""
        # int32 indices halve the index memory; index_select / index_put_ accept them.
        return idx.to(device=p.device, dtype=torch.int32 if p.numel() < 2**31 else torch.int64)  # [k]

    def _collect(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-name [k] vectors as saved (a sharded optimizer gathers every rank's part)."""
        return tensors

    def _mine(self, p: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
        """The part of a saved [k] vector of ``p`` this optimizer holds."""
        return saved

    def _init_param(self, name: str, p: torch.nn.Parameter, idx: torch.Tensor) -> None:
        storage = self._storage(p)
        if not storage.is_contiguous():
            raise ArtifactError(f"parameter {name!r} is not contiguous; sparse training needs flat views")
        p.requires_grad_(True)
        sd = _state_dtype(p)
        index = self._local_index(p, idx)
        k = index.numel()
        st = self.state[p]
        st["step"] = torch.tensor(0.0)
        st["index"] = index
        st["exp_avg"] = torch.zeros(k, dtype=sd, device=storage.device)
        st["exp_avg_sq"] = torch.zeros(k, dtype=sd, device=storage.device)
        if p.dtype != sd:  # a master copy only where the weight itself cannot hold float32 precision
            st["master"] = storage.detach().view(-1).index_select(0, index).to(sd)
        self._acc[p] = torch.zeros(k, dtype=sd, device=storage.device)
        self._has_grad[p] = False
        if self._hooked:
            self._handles.append(p.register_post_accumulate_grad_hook(self._gather))

    @property
    def named(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of every selected tensor, in group order."""
        return [pair for g in self.param_groups for pair in zip(g["param_names"], g["params"])]

    def _gather(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: fold the finished dense grad into [k] and free it."""
        grad = self._storage(p.grad).reshape(-1)
        self._acc[p].add_(grad.index_select(0, self.state[p]["index"]).to(self._acc[p].dtype))
        self._has_grad[p] = True
        p.grad = None

    def _values(self, p: torch.Tensor) -> torch.Tensor:
        """[k] current values at full state precision (a fresh tensor for float32/64 weights)."""
        st = self.state[p]
        return st["master"] if "master" in st else self._storage(p).detach().view(-1).index_select(0, st["index"])

    def _write(self, p: torch.Tensor, vals: torch.Tensor) -> None:
        """Write [k] values into the selected entries only (the rest stays bit-identical)."""
        with torch.no_grad():
            self._storage(p).view(-1).index_put_((self.state[p]["index"],), vals.to(p.dtype))

    def _gather_leftover_grads(self) -> None:
        """Dense gradients that bypassed the hook (hooks removed, or ``p.grad`` set by hand)."""
        for _, p in self.named:
            if p.grad is not None:
                self._gather(p)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None) -> float:
        """l2 norm of the accumulated gradient over the selected entries only, before clipping; scales the
        accumulators by ``clip_coefficient`` when ``max_norm`` > 0. A non-finite norm leaves them alone."""
        self._gather_leftover_grads()
        accs = [self._acc[p] for _, p in self.named if self._has_grad[p]]
        if not accs:
            return 0.0
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a) for a in accs]))  # one sync
        coef = clip_coefficient(norm, max_norm) if torch.isfinite(norm) else None
        if coef is not None:
            for a in accs:
                a.mul_(coef)
        return float(norm)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply AdamW to each [k_p] vector that received a gradient and write it back; then clear the
        accumulators. Returns the closure's loss (None without one), as torch optimizers do."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._gather_leftover_grads()
        for group in self.param_groups:
            for p in group["params"]:
                if not self._has_grad[p]:  # like torch.optim: a parameter without a gradient is skipped
                    continue
                st = self.state[p]
                st["step"] = st["step"] + 1  # a new tensor: never writes into a loaded state_dict's
                vals = self._values(p)
                adamw_update_(vals, self._acc[p], st["exp_avg"], st["exp_avg_sq"], int(st["step"]), group["lr"],
                              group["betas"], group["eps"], group["weight_decay"])
                self._write(p, vals)
        self.zero_grad()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the [k] accumulators (no dense gradient ever survives a hook)."""
        for p, acc in self._acc.items():
            acc.zero_()
            self._has_grad[p] = False
            p.grad = None  # set only where a hook was bypassed; the accumulators make set_to_none moot

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading (groups, hyperparameters, state), then undo its cast of the state to the weight's
        dtype: moments and masters stay float32 for bf16 weights, indices stay integers. Refuses a state
        saved for a different mask."""
        index = {p: self.state[p]["index"] for _, p in self.named}
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for sid, (name, p) in zip(saved_ids, self.named):
            saved, st = state_dict["state"].get(sid, {}), self.state[p]
            if "index" not in saved or not torch.equal(saved["index"].cpu().long(), index[p].cpu().long()):
                raise ArtifactError(f"optimizer state for {name!r} was saved for a different mask; load it into a "
                                    "SparseAdamW built with the same mask")
            st["index"] = index[p]
            for key in ("exp_avg", "exp_avg_sq", "master"):
                if key in saved:
                    st[key] = saved[key].to(device=p.device, dtype=_state_dtype(p), copy=True)

    def all_reduce_grads(self) -> None:
        """Data parallelism: sum the [k_p] accumulators across ranks, so ONLY the selected entries' values
        travel (k numbers, not d). A tensor counts as having a gradient if any rank gave it one. No-op in
        a single process."""
        from dualsft.distributed import all_reduce_dict_, world_size

        named = self.named
        if world_size() <= 1 or not named:
            return
        flags = torch.tensor([float(self._has_grad[p]) for _, p in named], dtype=torch.float64,
                             device=self._acc[named[0][1]].device)
        all_reduce_dict_({**{n: self._acc[p] for n, p in named}, "::got_grad": flags})
        for (_, p), f in zip(named, flags.tolist()):
            self._has_grad[p] = f > 0

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (call when training is over)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Optimizer state for a checkpoint: per name exp_avg, exp_avg_sq [k], step (int64 scalar)."""
        out = self._collect({f"{n}::{key}": self.state[p][key] for n, p in self.named
                             for key in ("exp_avg", "exp_avg_sq")})
        for n, p in self.named:
            out[f"{n}::step"] = self.state[p]["step"].to(torch.int64)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` saved (bit-exact)."""
        for n, p in self.named:
            st = self.state[p]
            st["exp_avg"].copy_(self._mine(p, tensors[f"{n}::exp_avg"]))
            st["exp_avg_sq"].copy_(self._mine(p, tensors[f"{n}::exp_avg_sq"]))
            st["step"] = torch.tensor(float(tensors[f"{n}::step"]))

    def exp_avg_sq(self) -> dict[str, torch.Tensor]:
        """{name: [k_p] raw second moments of the selected entries} of every tensor stepped at least once."""
        return self._collect({n: self.state[p]["exp_avg_sq"] for n, p in self.named if self.state[p]["step"] > 0})

    def trainable_values(self) -> dict[str, torch.Tensor]:
        """{name: [k] current values} (masters where present, so resuming keeps full precision)."""
        return self._collect({n: self._values(p).clone() for n, p in self.named})

    def load_trainable_values(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore trained values into the selected entries (and the masters)."""
        for n, p in self.named:
            v = self._mine(p, tensors[n]).to(device=self.state[p]["exp_avg"].device)
            if "master" in self.state[p]:
                self.state[p]["master"].copy_(v)
            self._write(p, v)

    def state_bytes(self) -> dict[str, int]:
        """Analytic bytes held by this optimizer: moments, accumulators, masters, indices."""
        b = {"moments": 0, "grad_accumulators": 0, "masters": 0, "indices": 0}
        for _, p in self.named:
            st, acc = self.state[p], self._acc[p]
            b["moments"] += 2 * st["exp_avg"].numel() * st["exp_avg"].element_size()
            b["grad_accumulators"] += acc.numel() * acc.element_size()
            b["masters"] += st["master"].numel() * st["master"].element_size() if "master" in st else 0
            b["indices"] += st["index"].numel() * st["index"].element_size()
        return b


class DenseAdamW:
    """``torch.optim.AdamW`` over whole tensors, optionally with gradient masking.

    With ``indices`` this is the REFERENCE TWIN (the oracle) of ``SparseAdamW`` — the authors' approach:
    dense gradients and full optimizer state for every selected tensor, gradients zeroed outside the mask
    before clipping and the step. Parameters absent from the mask get ``grad = None`` (torch skips them).
    torch's decoupled weight decay would also shrink entries whose gradient is zero, which the mask
    forbids, so with weight decay > 0 those entries are restored to their values before the step.
    Without ``indices`` it is plain AdamW over every parameter with ``requires_grad`` (full FT, LoRA).
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], hp: AdamWHyper,
                 indices: dict[str, torch.Tensor] | None = None):
        self.hp = hp
        self.named = [(n, p) for n, p in named_params if p.requires_grad]
        self.opt = torch.optim.AdamW([p for _, p in self.named], lr=hp.lr, betas=hp.betas, eps=hp.eps,
                                     weight_decay=hp.weight_decay)
        # Dense bool masks built once (d bytes, as the authors' release keeps them).
        self.keep = None if indices is None else {
            n: indices_to_dense(indices[n], p.shape, p.device) for n, p in self.named if n in indices}

    def _mask_grads(self) -> None:
        for n, p in self.named:
            if p.grad is None:
                continue
            if n not in self.keep:
                p.grad = None
            else:
                p.grad.mul_(self.keep[n])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """torch's AdamW groups (the loop writes each step's lr here)."""
        return self.opt.param_groups

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None) -> float:
        """Mask (reference mode), then ``torch.nn.utils.clip_grad_norm_``; returns the norm before clipping.
        A non-finite norm leaves the gradients alone (the caller reports it and does not step)."""
        if self.keep is not None:
            self._mask_grads()
        with_grad = [p for _, p in self.named if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad]) if with_grad else torch.zeros(())
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 DTensor grads: one number
        if torch.isfinite(norm) and max_norm is not None and max_norm > 0:  # split to check the norm first
            torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm)  # takes params, reads .grad
        return float(norm)

    @torch.no_grad()
    def step(self) -> None:
        """torch's AdamW step; in reference mode, entries outside the mask keep their values."""
        before = None
        if self.keep is not None and self.hp.weight_decay > 0:
            before = {n: p.detach().clone() for n, p in self.named if n in self.keep}
        self.opt.step()
        if before is not None:
            for n, p in self.named:
                if n in before:
                    p.copy_(torch.where(self.keep[n], p, before[n]))

    def all_reduce_grads(self) -> None:
        """Data parallelism: sum the dense gradients of the trainable tensors across ranks (full FT, LoRA,
        the dense-masked reference). A tensor no rank gave a gradient keeps ``grad = None``. No-op in a
        single process."""
        from dualsft.distributed import all_reduce_grads_

        all_reduce_grads_(dict(self.named))

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Per trainable parameter: exp_avg, exp_avg_sq, step (torch's own tensors)."""
        out = {}
        for n, p in self.named:
            st = self.opt.state.get(p)
            if st:
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    out[f"{n}::{key}"] = st[key]
        return out

    def exp_avg_sq(self) -> dict[str, torch.Tensor]:
        """{name: torch's raw exp_avg_sq, shaped like the weight} of every tensor stepped at least once."""
        return {n: self.opt.state[p]["exp_avg_sq"] for n, p in self.named if p in self.opt.state}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, p in self.named:
            if f"{n}::step" in tensors:
                self.opt.state[p] = {k: tensors[f"{n}::{k}"].to(p.device if k != "step" else "cpu").clone()
                                     for k in ("step", "exp_avg", "exp_avg_sq")}

    def trainable_values(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named}

    def load_trainable_values(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(tensors[n])

    def state_bytes(self) -> dict[str, int]:
        """Analytic bytes of moments + dense gradients (+ dense bool masks in reference mode)."""
        d = sum(p.numel() * p.element_size() for _, p in self.named)
        masks = 0 if self.keep is None else sum(m.numel() for m in self.keep.values())
        return {"moments": 2 * d, "grads": d, "masks": masks}
