"""Optimizers for restricted fine-tuning (docs/method.md §5 step 5, §7).

``SparseAdamW`` is the fast path: for each parameter p with k_p selected entries (sorted flat indices
``idx_p`` [k_p]) it holds only ``exp_avg``/``exp_avg_sq``/grad accumulator [k_p] in float32 (float64 for
float64 weights) and, when the weight is narrower than float32 (bf16/fp16), a float32 master copy [k_p].
For float32/float64 weights the weight's own entries are the master (a copy would be identical).
Parameters with no selected entry get ``requires_grad=False``: autograd never computes their gradient.
A partially selected tensor's dense gradient is gathered into the accumulator by a post-accumulate-grad
hook the moment autograd finishes it, and ``p.grad`` is dropped at once, so about one dense gradient
lives at a time. The update writes only the selected entries (``index_put_``), so every other entry
stays bit-identical to θ0.

``DenseAdamW`` wraps ``torch.optim.AdamW`` behind the same small interface; with a mask it is the
authors' approach (zero the gradient outside the mask) and the ORACLE that tests ``SparseAdamW``.

Memory per selected entry (bytes): exp_avg 4 + exp_avg_sq 4 + accumulator 4 + index 4 (int32)
(+ master 4 for bf16/fp16 weights), against 12 bytes per entry of EVERY tensor for dense AdamW
(grad 4 + exp_avg 4 + exp_avg_sq 4).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from dualsft.errors import ArtifactError
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

    lr: float

    def step(self, max_grad_norm: float | None = None) -> float:
        """Clip (if asked) and apply one update; returns the gradient norm before clipping."""
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


def adamw_update_(values: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, lr: float, hp: AdamWHyper) -> None:
    """One AdamW step on flat vectors, in place, in the same operation order as ``torch.optim.AdamW``.

    Args:
        values: [k] weights (the master copy), updated in place.
        grad: [k] gradient of the mean loss.
        exp_avg, exp_avg_sq: [k] first/second moments, updated in place.
        step: 1-based step count (for bias correction).
    """
    beta1, beta2 = hp.betas
    values.mul_(1 - lr * hp.weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(hp.eps)
    values.addcdiv_(exp_avg, denom, value=-step_size)


def clip_coefficient(norm: torch.Tensor, max_grad_norm: float | None) -> float | None:
    """The factor ``torch.nn.utils.clip_grad_norm_`` would scale by (None when no clipping applies)."""
    if max_grad_norm is None or max_grad_norm <= 0:
        return None
    return min(1.0, max_grad_norm / (float(norm) + 1e-6))


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class _SparseSlot:
    """State of one partially or fully selected parameter. Shapes: k = number of selected entries."""

    def __init__(self, name: str, p: torch.nn.Parameter, idx: torch.Tensor):
        if not p.is_contiguous():
            raise ArtifactError(f"parameter {name!r} is not contiguous; sparse training needs flat views")
        self.name, self.p = name, p
        sd = _state_dtype(p)
        # int32 indices halve the index memory; index_select / index_put_ accept them.
        small = p.numel() < 2**31
        self.idx = idx.to(device=p.device, dtype=torch.int32 if small else torch.int64)  # [k]
        k = self.idx.numel()
        self.exp_avg = torch.zeros(k, dtype=sd, device=p.device)
        self.exp_avg_sq = torch.zeros(k, dtype=sd, device=p.device)
        self.grad_acc = torch.zeros(k, dtype=sd, device=p.device)
        # A master copy only where the weight itself cannot hold float32 precision.
        self.master = p.detach().view(-1).index_select(0, self.idx).to(sd) if p.dtype != sd else None
        self.step = 0
        self.got_grad = False

    def gather_grad(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: fold the finished dense grad into [k] and free it."""
        self.grad_acc.add_(p.grad.view(-1).index_select(0, self.idx).to(self.grad_acc.dtype))
        self.got_grad = True
        p.grad = None

    def values(self) -> torch.Tensor:
        """[k] current values at full state precision (a fresh tensor for float32/64 weights)."""
        return self.master if self.master is not None else self.p.detach().view(-1).index_select(0, self.idx)

    def write(self, vals: torch.Tensor) -> None:
        """Write [k] values into the selected entries only (the rest stays bit-identical)."""
        with torch.no_grad():
            self.p.view(-1).index_put_((self.idx,), vals.to(self.p.dtype))


class SparseAdamW:
    """AdamW whose state and master values exist only for the selected entries (see module docstring).

    Args:
        named_params: (name, parameter) pairs, tied weights once (``model.named_parameters()``).
        indices: {name: sorted flat indices [k_p]} of the selected entries; names absent are frozen.
        hp: AdamW hyperparameters; ``lr`` may be changed each step through ``self.lr``.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], indices: dict[str, torch.Tensor],
                 hp: AdamWHyper):
        self.hp, self.lr = hp, hp.lr
        self.slots: list[_SparseSlot] = []
        self._handles = []
        params = dict(named_params)
        unknown = sorted(set(indices) - set(params))
        if unknown:
            raise ArtifactError(f"mask names parameters this model does not have: {unknown[:5]}")
        for name, p in params.items():
            idx = indices.get(name)
            if idx is None or idx.numel() == 0:
                p.requires_grad_(False)  # no selected entry: autograd never computes its gradient
                continue
            p.requires_grad_(True)
            slot = _SparseSlot(name, p, idx)
            self.slots.append(slot)
            self._handles.append(p.register_post_accumulate_grad_hook(slot.gather_grad))

    @property
    def num_selected(self) -> int:
        """k: total selected entries."""
        return sum(s.idx.numel() for s in self.slots)

    def grad_norm(self) -> torch.Tensor:
        """l2 norm of the accumulated gradient over the selected entries only (0-dim tensor)."""
        norms = [torch.linalg.vector_norm(s.grad_acc) for s in self.slots if s.got_grad]
        if not norms:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack(norms))  # one device sync later, not one per tensor

    @torch.no_grad()
    def step(self, max_grad_norm: float | None = None) -> float:
        """Clip over the selected entries, apply AdamW to each [k_p] vector, write back; returns the norm
        before clipping. A non-finite norm skips the update (weights untouched)."""
        norm = self.grad_norm()
        if not torch.isfinite(norm):
            return float(norm)  # leave the weights alone; the loop raises NonFiniteLossError
        coef = clip_coefficient(norm, max_grad_norm)
        for s in self.slots:
            if not s.got_grad:  # like torch.optim: a parameter without a gradient is skipped
                continue
            if coef is not None:
                s.grad_acc.mul_(coef)
            s.step += 1
            vals = s.values()
            adamw_update_(vals, s.grad_acc, s.exp_avg, s.exp_avg_sq, s.step, self.lr, self.hp)
            s.write(vals)
        return float(norm)

    def zero_grad(self) -> None:
        """Reset the [k] accumulators (no dense gradient ever survives a hook)."""
        for s in self.slots:
            s.grad_acc.zero_()
            s.got_grad = False

    def all_reduce_grads(self) -> None:
        """Data parallelism: sum the [k_p] accumulators across ranks, so ONLY the selected entries' values
        travel (k numbers, not d). A slot counts as having a gradient if any rank gave it one. No-op in
        a single process."""
        from dualsft.distributed import all_reduce_dict_, world_size

        if world_size() <= 1 or not self.slots:
            return
        bufs = {s.name: s.grad_acc for s in self.slots}
        flags = torch.tensor([float(s.got_grad) for s in self.slots], dtype=torch.float64,
                             device=self.slots[0].grad_acc.device)
        all_reduce_dict_({**bufs, "::got_grad": flags})
        for s, f in zip(self.slots, flags.tolist()):
            s.got_grad = f > 0

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (call when training is over)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Optimizer state for a checkpoint: per name exp_avg, exp_avg_sq [k], step (int64 scalar)."""
        out = {}
        for s in self.slots:
            out[f"{s.name}::exp_avg"] = s.exp_avg
            out[f"{s.name}::exp_avg_sq"] = s.exp_avg_sq
            out[f"{s.name}::step"] = torch.tensor(s.step, dtype=torch.int64)
        return out

    def exp_avg_sq(self) -> dict[str, torch.Tensor]:
        """{name: [k_p] raw second moments of the selected entries} of every slot stepped at least once."""
        return {s.name: s.exp_avg_sq for s in self.slots if s.step > 0}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` saved (bit-exact)."""
        for s in self.slots:
            s.exp_avg.copy_(tensors[f"{s.name}::exp_avg"])
            s.exp_avg_sq.copy_(tensors[f"{s.name}::exp_avg_sq"])
            s.step = int(tensors[f"{s.name}::step"])

    def trainable_values(self) -> dict[str, torch.Tensor]:
        """{name: [k] current values} (masters where present, so resuming keeps full precision)."""
        return {s.name: s.values().clone() for s in self.slots}

    def load_trainable_values(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore trained values into the selected entries (and the masters)."""
        for s in self.slots:
            v = tensors[s.name].to(device=s.p.device)
            if s.master is not None:
                s.master.copy_(v)
            s.write(v)

    def state_bytes(self) -> dict[str, int]:
        """Analytic bytes held by this optimizer: moments, accumulators, masters, indices."""
        b = {"moments": 0, "grad_accumulators": 0, "masters": 0, "indices": 0}
        for s in self.slots:
            b["moments"] += 2 * s.exp_avg.numel() * s.exp_avg.element_size()
            b["grad_accumulators"] += s.grad_acc.numel() * s.grad_acc.element_size()
            b["masters"] += 0 if s.master is None else s.master.numel() * s.master.element_size()
            b["indices"] += s.idx.numel() * s.idx.element_size()
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
        self.hp, self.lr = hp, hp.lr
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

    @torch.no_grad()
    def step(self, max_grad_norm: float | None = None) -> float:
        """Mask (reference mode), clip as ``clip_grad_norm_`` does, step; returns the norm before clipping.
        A non-finite norm skips the update (weights untouched) and is returned for the caller to report."""
        if self.keep is not None:
            self._mask_grads()
        with_grad = [p for _, p in self.named if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad]) if with_grad else torch.zeros(())
        if not torch.isfinite(norm):
            return float(norm)  # leave the weights alone; the loop raises NonFiniteLossError
        if max_grad_norm is not None and max_grad_norm > 0:  # = clip_grad_norm_, split to check the norm first
            torch.nn.utils.clip_grads_with_norm_(with_grad, max_grad_norm, norm)  # takes params, reads .grad
        before = None
        if self.keep is not None and self.hp.weight_decay > 0:
            before = {n: p.detach().clone() for n, p in self.named if n in self.keep}
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        self.opt.step()
        if before is not None:
            for n, p in self.named:
                if n in before:
                    p.copy_(torch.where(self.keep[n], p, before[n]))
        return float(norm)

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
