"""Sparse training on FSDP2-sharded weights (``--sharding fsdp``; docs/scaling.md §4b).

    torchrun --nproc_per_node N -m dualsft train --sharding fsdp ...   (gloo on CPU, nccl on GPUs)

``shard_model`` applies PyTorch's own sharding engine, ``torch.distributed.fsdp.fully_shard``, to every
decoder layer and then to the whole model (embeddings, final norm and head, tied or not, in the root
group). Each rank then holds rows [start, end) of every parameter (dim 0 split as ``torch.chunk`` does:
⌈rows/N⌉ per rank, the last ones shorter or empty); FSDP gathers a layer's weights for its forward and
backward and reduce-scatters its gradients, so each rank receives the SUMMED gradient of its own rows
(the divide factor is set to 1: every rank already divides its loss by the step's global example count,
as in data-parallel training, docs/training.md).

``ShardedSparseAdamW`` is ``SparseAdamW`` on those shards: a rank keeps exp_avg, exp_avg_sq, the gradient
accumulator (and a float32 master for bf16 weights) ONLY for the mask's entries inside its own rows. The
mask's sorted flat indices split into contiguous per-rank runs (rows are contiguous in the flat order),
so the concatenation of every rank's [k_r] values in rank order is the global [k] vector: that is how
trained values, optimizer state and checkpoints are gathered (``trainable_values`` and ``state_tensors``
are collectives: every rank must call them), and a checkpoint holds the same tensors as an unsharded
run's (it resumes under either). Entries outside the mask are never written: they stay bit-identical.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from dualsft import distributed as dist
from dualsft.errors import ConfigError
from dualsft.training.optim import DenseAdamW, SparseAdamW, clip_coefficient

log = logging.getLogger(__name__)
SHARDINGS = ("auto", "none", "fsdp")
SHARDING_HELP = ("auto (default): fsdp under torchrun with more than one process when the run supports it, else "
                 "none; fsdp: shard the weights (and optimizer state / statistics) across the processes with "
                 "PyTorch FSDP2 (docs/scaling.md §4b); none: every rank holds the whole model (data parallel)")


def resolve_sharding(requested: str, blocker: str | None = None) -> str:
    """The sharding a stage runs with: "none" or "fsdp". "auto" is fsdp when torchrun started more than one
    process, unless ``blocker`` (why this run cannot shard, e.g. "--method lora") is given: then data
    parallel ("none", logged once). An explicit "fsdp" with a ``blocker`` raises ConfigError."""
    if requested not in SHARDINGS:
        raise ConfigError(f"--sharding must be one of {SHARDINGS}, got {requested!r}")
    if requested == "fsdp" and blocker:
        raise ConfigError(f"--sharding fsdp does not support {blocker}; use --sharding none (data parallel)")
    if requested != "auto":
        return requested
    if dist.env_world()[1] <= 1:
        return "none"
    if blocker:
        if dist.env_world()[0] == 0:
            log.info("--sharding auto: data parallel (FSDP2 does not support %s)", blocker)
        return "none"
    return "fsdp"


def training_blocker(method: str, loss_chunk: int) -> str | None:
    """Why a warm-up (method "full") or training run cannot run under FSDP2, or None."""
    if method not in ("sparse", "full"):
        return f"--method {method}"
    return "--loss-chunk (it calls the decoder and the head apart from FSDP's root hooks)" if loss_chunk else None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers causal LM (``base_model.layers`` or GPT-2's ``.h``)."""
    from dualsft.models import base_lm

    lm = base_lm(model)
    inner = getattr(lm, "base_model", lm)
    for name in ("layers", "h", "blocks"):
        blocks = getattr(inner, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return list(blocks)
    raise ConfigError(f"--sharding fsdp: found no decoder layers (base_model.layers or .h) in {type(lm).__name__}")


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` every decoder layer, then the model (in place); gradients reduce-scattered as SUMS.
    Needs an initialised process group (``dist.dist_context``); with one process it shards over one rank."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not torch.distributed.is_initialized():
        raise ConfigError("--sharding fsdp needs torch.distributed: launch with torchrun (one process works too)")
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model


def load_stage_model(model: str | None, dtype: str, device: str, attn_implementation: str | None,
                     sharding: str) -> torch.nn.Module:
    """The stage's model: ``load_model`` on the rank's device, or under ``sharding`` "fsdp" on the CPU in the
    dtype the rank's device would get ("auto": bf16 on CUDA): ``fully_shard`` then moves each module's
    tensors to the mesh's device and keeps only this rank's shard, so no device holds the whole model."""
    from dualsft.models import load_model, resolve_device, resolve_dtype

    if sharding != "fsdp":
        return load_model(model, dtype, dist.rank_device(device), attn_implementation=attn_implementation)
    dt = resolve_dtype(dtype, resolve_device(dist.rank_device(device)))
    return load_model(model, str(dt).replace("torch.", ""), "cpu", attn_implementation=attn_implementation)


def local_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of dim 0 that ``rank`` holds under FSDP2's even sharding (torch.chunk: ⌈rows/N⌉ each)."""
    per = math.ceil(rows / world) if rows else 0
    start = min(rank * per, rows)
    return start, min(start + per, rows)


def local_span(index: torch.Tensor, shape: tuple[int, ...], rank: int, world: int) -> tuple[int, int, int]:
    """(a, b, offset): this rank's entries are ``index[a:b]`` (sorted flat indices into ``shape``), at local
    flat positions ``index[a:b] - offset`` of its shard."""
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    start, end = local_rows(shape[0], rank, world)
    a, b = torch.searchsorted(index.long(), torch.tensor([start * cols, end * cols])).tolist()
    return int(a), int(b), start * cols


def full_on_main(t: torch.Tensor) -> torch.Tensor | None:
    """A sharded DTensor gathered whole (a collective: every rank calls it), kept on CPU on rank 0 only (None
    elsewhere), so the ranks never all hold the model; a plain tensor is returned (on CPU) as is."""
    full = t.full_tensor() if dist.is_sharded(t) else t
    return full.detach().cpu() if dist.is_main() else None


def _rows_of(full: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a whole tensor (as FSDP2 shards a parameter on dim 0)."""
    start, end = local_rows(full.shape[0], dist.rank(), dist.world_size())
    return full[start:end]


class ShardedSparseAdamW(SparseAdamW):
    """``SparseAdamW`` over FSDP2 shards: state only for the selected entries in this rank's rows (module
    docstring). Gradients arrive in ``p.grad`` (FSDP's reduce-scatter, already summed over ranks) and are
    folded into [k_r] before clipping and the step, so ``all_reduce_grads`` has nothing left to do.
    Overrides only where the entries live (``_storage``, ``_local_index``, ``_collect``, ``_mine``), the
    cross-rank bits of clipping and the gradient flags."""

    _hooked = False  # FSDP assigns the sharded gradient itself: no post-accumulate-grad hook fires
    gathers_across_ranks = True  # trainable_values / state_tensors are collectives (checkpoint.save_checkpoint)

    def _storage(self, t: torch.Tensor) -> torch.Tensor:
        return dist.local_tensor(t)

    def _local_index(self, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        a, b, offset = local_span(idx, tuple(p.shape), dist.rank(), dist.world_size())
        self.state[p]["span"] = (a, b)
        return (idx[a:b].long() - offset).to(device=dist.local_tensor(p).device, dtype=torch.int64)

    def _collect(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: [k]} from every rank's {name: [k_r]} (rank order = flat order). A collective: every rank
        calls it (checkpoints, the delta, c)."""
        return {n: dist.all_gather_concat(v.detach().cpu()) for n, v in tensors.items()}

    def _mine(self, p: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
        a, b = self.state[p]["span"]
        return saved[a:b]

    def all_reduce_grads(self) -> None:
        """FSDP's reduce-scatter already summed the gradients; only agree on which tensors got one."""
        self._gather_leftover_grads()
        named = self.named
        if dist.world_size() <= 1 or not named:
            return
        flags = torch.tensor([float(self._has_grad[p]) for _, p in named], dtype=torch.float64,
                             device=dist.comm_device())
        torch.distributed.all_reduce(flags)
        for (_, p), f in zip(named, flags.tolist()):
            self._has_grad[p] = f > 0

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None) -> float:
        """l2 norm over the selected entries of EVERY rank (one all-reduce of the squared sums), then
        the same clip coefficient on every rank."""
        self._gather_leftover_grads()
        accs = [self._acc[p] for _, p in self.named if self._has_grad[p]]
        sq = torch.zeros((), dtype=torch.float64, device=dist.comm_device())
        for a in accs:
            sq += a.double().pow(2).sum().to(sq.device)
        if dist.world_size() > 1:
            torch.distributed.all_reduce(sq)
        norm = sq.sqrt()
        coef = clip_coefficient(norm, max_norm) if torch.isfinite(norm) else None
        if coef is not None:
            for a in accs:
                a.mul_(coef)
        return float(norm)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise ConfigError("ShardedSparseAdamW restores from state_tensors/trainable_values (checkpoint.py), not a "
                          "torch state_dict")


class ShardedDenseAdamW(DenseAdamW):
    """Full fine-tuning (and the warm-up) on FSDP2 shards: torch's AdamW steps the DTensor parameters, so
    exp_avg and exp_avg_sq are sharded like the weights (each rank 1/N). Gradients arrive reduce-scattered
    (summed); DenseAdamW's clipping norm over DTensor gradients is already a reduction across ranks. Whole tensors
    (trained values, optimizer state, c) are gathered one at a time onto rank 0 (``full_on_main``)."""

    gathers_across_ranks = True  # trainable_values / state_tensors are collectives (checkpoint.save_checkpoint)

    def all_reduce_grads(self) -> None:
        """FSDP's reduce-scatter already summed the gradients."""

    def _gather_all(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {n: full_on_main(t) for n, t in tensors.items()}
        return {n: t for n, t in out.items() if t is not None}

    def trainable_values(self) -> dict[str, torch.Tensor]:
        """{name: whole trained tensor} on rank 0 ({} elsewhere); a collective."""
        return self._gather_all({n: p for n, p in self.named})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for n, p in self.named:
            st = self.opt.state.get(p)
            if st:
                out.update(self._gather_all({f"{n}::exp_avg": st["exp_avg"], f"{n}::exp_avg_sq": st["exp_avg_sq"]}))
                out[f"{n}::step"] = st["step"]
        return out if dist.is_main() else {}

    def exp_avg_sq(self) -> dict[str, torch.Tensor]:
        """c gathered tensor by tensor onto rank 0 ({} elsewhere); a collective."""
        return self._gather_all({n: self.opt.state[p]["exp_avg_sq"] for n, p in self.named if p in self.opt.state})

    def load_trainable_values(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.named:
                dist.local_tensor(p).copy_(_rows_of(tensors[n]))

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor

        for n, p in self.named:
            if f"{n}::step" not in tensors:
                continue
            st = {"step": tensors[f"{n}::step"].clone()}
            for k in ("exp_avg", "exp_avg_sq"):
                local = _rows_of(tensors[f"{n}::{k}"]).to(dist.local_tensor(p).device).clone()
                st[k] = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            self.opt.state[p] = st
