"""Multi-process helpers on ``torch.distributed`` (data parallelism for scoring, warm-up and training).

    torchrun --standalone --nproc_per_node 2 -m dualsft score ...        # 2 processes, gloo on CPU
    torchrun --nproc_per_node 8 -m dualsft train ...                      # 8 GPUs, nccl, cuda:LOCAL_RANK

Conventions every stage follows:
- the examples of a pass (or of one optimizer step) are split by ``shard`` into contiguous, deterministic
  pieces, one per rank; every example is on exactly one rank, for any N (divisible or not);
- per-parameter sums (G, the unnormalised v_new and v_prior, gradients) are summed across ranks with
  ``all_reduce_dict_`` in float32/float64 buffers, THEN normalised by the GLOBAL count, so N ranks give
  the single-process result up to the order of float summation;
- per-example outputs (row scores, losses) are gathered back into POOL ORDER with ``gather_rows``;
- only rank 0 logs INFO and writes artifacts (``is_main``), followed by a ``barrier``.
Everything is a no-op in a single process (no WORLD_SIZE, or WORLD_SIZE=1): the CPU path always works.
Collectives move tensors only (no ``all_gather_object``: it pickles).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dualsft.errors import ConfigError

BUCKET_BYTES = 256 << 20  # all-reduce at most this many bytes at once (bounds the temporary flat buffer)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when there is more than one process (collectives do something)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) outside torchrun."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e}); launch with torchrun") from e


def dist_context(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (idempotent) and return this process's context.

    Backend: nccl when the stage runs on CUDA (``device`` auto/cuda with a GPU present), gloo otherwise.
    With WORLD_SIZE <= 1 nothing is initialised and the single-process context is returned.
    """
    rank, world, local = env_world()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


def rank_device(device: str = "auto") -> str:
    """The device this rank should load its model on: with several ranks on CUDA, ``cuda:LOCAL_RANK``
    (each rank its own GPU); otherwise ``device`` unchanged (CPU ranks share the host)."""
    _, world, local = env_world()
    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local}"
    return device


def is_main() -> bool:
    """True on rank 0 (and in a single process): the only rank that logs INFO and writes artifacts."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_world()[0] == 0


def world_size() -> int:
    """Number of processes in the initialised group (1 when none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when no group is initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def comm_device() -> torch.device:
    """Where small tensors must live for a collective: the rank's GPU under nccl, else the CPU."""
    if world_size() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op in a single process). Call after rank 0's writes."""
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group if one was joined (end of a CLI command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n_items: int, rank: int, world: int, strategy: str = "contiguous") -> list[int]:
    """Positions 0..n_items-1 owned by ``rank`` of ``world``: every position on exactly one rank.

    ``contiguous``: rank r gets [r·q + min(r, m), ...) with q, m = divmod(n, world) (the first m ranks
    hold one more); ``strided``: r, r + world, r + 2·world, ... Deterministic; any n (0 included).
    """
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"shard: need 0 <= rank < world, got rank {rank}, world {world}")
    if n_items < 0:
        raise ConfigError(f"shard: n_items must be >= 0, got {n_items}")
    if strategy == "strided":
        return list(range(rank, n_items, world))
    if strategy != "contiguous":
        raise ConfigError(f"shard: strategy must be 'contiguous' or 'strided', got {strategy!r}")
    q, m = divmod(n_items, world)
    start = rank * q + min(rank, m)
    return list(range(start, start + q + (1 if rank < m else 0)))


def local_items(items: list, strategy: str = "contiguous") -> tuple[list, list[int]]:
    """This rank's share of ``items`` and their positions in ``items`` (all of them in one process)."""
    pos = shard(len(items), rank(), world_size(), strategy)
    return [items[i] for i in pos], pos


def _reduce_dtype(t: torch.Tensor) -> torch.dtype:
    """Sum in at least float32: bf16/fp16 sums across ranks lose the small entries."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of same-(reduce dtype, device) tensors of at most BUCKET_BYTES each."""
    group: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * torch.finfo(_reduce_dtype(t)).bits // 8 if t.is_floating_point() else t.numel() * 8
        if group and (size + nbytes > BUCKET_BYTES or (_reduce_dtype(t), t.device) !=
                      (_reduce_dtype(group[0]), group[0].device)):
            yield group
            group, size = [], 0
        group.append(t)
        size += nbytes
    if group:
        yield group


def all_reduce_dict_(tensors: MutableMapping[str, torch.Tensor]) -> MutableMapping[str, torch.Tensor]:
    """Sum every tensor of ``tensors`` across ranks, IN PLACE (the dict's own tensors change); returns it.

    Tensors are flattened into buckets (one collective per bucket, not per tensor) and summed in
    float32/float64 (bf16/fp16 are upcast for the sum and written back). Every rank must pass the same
    names in the same order with the same shapes. No-op in a single process.
    """
    if world_size() <= 1 or not tensors:
        return tensors
    for group in _buckets(list(tensors.values())):
        dt = _reduce_dtype(group[0])
        flat = torch.cat([t.reshape(-1).to(dt) for t in group])  # [Σ numel]
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return tensors


def all_reduce_grads_(params: Mapping[str, torch.Tensor]) -> None:
    """Data-parallel gradient sum of dense ``.grad``s across ranks (manual DDP: one bucketed all-reduce).

    A parameter without a gradient on this rank (e.g. a rank with no example in the step) takes part
    with zeros; one that no rank gave a gradient keeps ``grad = None`` (torch optimizers skip it).
    Every rank must pass the same names in the same order. No-op in a single process.
    """
    if world_size() <= 1 or not params:
        return
    first = next(iter(params.values()))
    flags = torch.tensor([float(p.grad is not None) for p in params.values()], dtype=torch.float64,
                         device=first.device)  # [n_params] 1 where this rank has a gradient
    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_dict_({**{n: p.grad for n, p in params.items()}, "::has_grad": flags})
    for p, f in zip(params.values(), flags.tolist()):
        if f == 0:
            p.grad = None


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few Python numbers across ranks (float64 on the wire); unchanged in a single process."""
    return _all_reduce_numbers(values, dist.ReduceOp.SUM)


def all_reduce_max(values: list[float]) -> list[float]:
    """The largest of each number across ranks (float64 on the wire); unchanged in a single process."""
    return _all_reduce_numbers(values, dist.ReduceOp.MAX)


def _all_reduce_numbers(values: list[float], op: dist.ReduceOp.RedOpType) -> list[float]:
    if world_size() <= 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2-sharded DTensor (its storage: writes reach the tensor); a plain tensor as is."""
    return t._local_tensor if is_sharded(t) else t  # DTensor keeps its shard there


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter or gradient under ``--sharding fsdp``)."""
    return hasattr(t, "_local_tensor")


def check_same(values: list[float], what: str) -> None:
    """Raise ConfigError unless every rank passes the same numbers (e.g. a mask's k and index checksum):
    data parallelism is only correct when the ranks agree on what they train. No-op in one process."""
    if world_size() <= 1:
        return
    hi = torch.tensor(values, dtype=torch.float64, device=comm_device())
    lo = hi.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        raise ConfigError(f"the ranks disagree on {what} (rank {rank()} has {values}, the ranks span "
                          f"{lo.tolist()} to {hi.tolist()}): give every rank the same files")


def gather_rows(local_scores: torch.Tensor, local_indices: torch.Tensor | list[int], n: int) -> torch.Tensor:
    """Reassemble per-example values computed on shards into POOL ORDER.

    Args:
        local_scores: [n_r] or [n_r, C] values of this rank's examples (any order).
        local_indices: [n_r] their pool positions (0..n-1); together the ranks cover each position once.
        n: pool size N.
    Returns:
        [N] (or [N, C]) on every rank, row i = the value of pool position i, on ``local_scores``'s device.
    Raises ConfigError if a position is missing or covered twice. Shards may differ in length (the
    all_gather pads to the longest, then drops the padding).
    """
    home = local_scores.device
    idx = torch.as_tensor(local_indices, dtype=torch.int64).reshape(-1).to(home)
    if idx.numel() != local_scores.shape[0]:
        raise ConfigError(f"gather_rows: {local_scores.shape[0]} scores but {idx.numel()} indices")
    if world_size() > 1:
        idx, local_scores = _all_gather_padded(idx.to(comm_device()), local_scores.to(comm_device()))
        idx, local_scores = idx.to(home), local_scores.to(home)
    seen = torch.zeros(n, dtype=torch.int64, device=idx.device)
    seen.index_add_(0, idx, torch.ones_like(idx))
    if not bool((seen == 1).all()):
        bad = torch.nonzero(seen != 1).flatten()[:10].tolist()
        raise ConfigError(f"gather_rows: pool positions {bad} are covered {seen[bad].tolist()} times (want once each)")
    out = torch.empty((n, *local_scores.shape[1:]), dtype=local_scores.dtype, device=local_scores.device)
    out[idx] = local_scores
    return out


def all_gather_concat(values: torch.Tensor) -> torch.Tensor:
    """Every rank's [n_r, ...] ``values`` concatenated in rank order (lengths may differ); a collective.
    In one process: ``values`` itself."""
    if world_size() <= 1:
        return values
    home = values.device
    idx = torch.zeros(values.shape[0], dtype=torch.int64, device=comm_device())
    return _all_gather_padded(idx, values.to(comm_device()))[1].to(home)


def _all_gather_padded(idx: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """all_gather variable-length (idx [n_r], values [n_r, ...]) from every rank; concatenated, padding dropped."""
    world = world_size()
    counts = torch.zeros(world, dtype=torch.int64, device=idx.device)
    counts[rank()] = idx.numel()
    dist.all_reduce(counts)
    longest = int(counts.max())
    pad_idx = torch.full((longest,), -1, dtype=torch.int64, device=idx.device)
    pad_idx[: idx.numel()] = idx
    pad_val = torch.zeros((longest, *values.shape[1:]), dtype=values.dtype, device=values.device)
    pad_val[: values.shape[0]] = values
    all_idx = [torch.empty_like(pad_idx) for _ in range(world)]
    all_val = [torch.empty_like(pad_val) for _ in range(world)]
    dist.all_gather(all_idx, pad_idx)
    dist.all_gather(all_val, pad_val)
    keep = [slice(0, int(c)) for c in counts]
    return (torch.cat([a[k] for a, k in zip(all_idx, keep)]), torch.cat([v[k] for v, k in zip(all_val, keep)]))
