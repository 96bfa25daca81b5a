"""Scoring on FSDP2 shards (``torchrun ... -m dualsft score --sharding fsdp``; docs/scaling.md §4b).

Every per-parameter statistic lives sharded like the weights: rank r holds rows [start, end) of v_new,
v_prior, G, c, u and φ_param (``training/sharded.local_rows``), because the passes' backwards run through
FSDP, whose reduce-scatter leaves each rank the SUM over all ranks' examples of its own rows of the
gradient (``stats.param_grads``). u, v and φ_param are elementwise in those statistics, so each rank
computes its rows alone; c is read from the warm-up's file one row range at a time (``load_local_rows``).

The row scores φ_data[n] = ⟨u, g_n⟩ need each layer's u WHOLE while the ghost hooks of that layer run.
``DirectionSlots`` registers, before ``fully_shard``, one frozen parameter per scored tensor inside the
FSDP unit (decoder layer, or the root for embeddings, final norm and head) that owns the tensor. FSDP then
shards u with the weights and all-gathers it in the SAME collective as the layer's weights, for the
layer's forward and backward only: no rank ever holds all of u, and no extra collective is issued.

Outputs are gathered one tensor at a time onto rank 0 (``gather_whole``), which writes the usual
unsharded files: `select`, `train` and `merge` read them as from a single process.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from dualsft import distributed as dist
from dualsft.errors import ConfigError
from dualsft.training.sharded import decoder_layers, full_on_main, local_rows, shard_model

SLOTS = "dualsft_u"  # name of the container module that holds a unit's u slots


class DirectionSlots(Mapping[str, torch.Tensor]):
    """u per parameter name, stored as frozen parameters that FSDP shards and gathers with the weights.

    Reading ``slots[name]`` gives the WHOLE u of that parameter, valid only while its FSDP unit is gathered
    (inside the unit's forward or backward: where the ghost hooks read it); reading it elsewhere raises.
    ``load(u_local)`` writes this rank's rows of u."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        """Create the slots (call BEFORE ``fully_shard``): zeros shaped and typed like each parameter."""
        params = dict(model.named_parameters())
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ConfigError(f"no parameter named {unknown[:3]} to score")
        owner = {id(p): layer for layer in decoder_layers(model) for p in layer.parameters()}
        self.slot: dict[str, tuple[torch.nn.Module, str]] = {}
        for n in names:
            unit = owner.get(id(params[n]), model)
            if not hasattr(unit, SLOTS):
                unit.add_module(SLOTS, torch.nn.Module())
            box, attr = getattr(unit, SLOTS), n.replace(".", "__")
            box.register_parameter(attr, torch.nn.Parameter(torch.zeros_like(params[n]), requires_grad=False))
            self.slot[n] = (box, attr)

    def __getitem__(self, name: str) -> torch.Tensor:
        box, attr = self.slot[name]
        t = getattr(box, attr)
        if dist.is_sharded(t):
            raise RuntimeError(f"u of {name!r} read outside its layer's forward/backward (it is sharded there)")
        return t

    def __contains__(self, name: object) -> bool:
        return name in self.slot

    def __iter__(self) -> Iterator[str]:
        return iter(self.slot)

    def __len__(self) -> int:
        return len(self.slot)

    def local_shards(self) -> dict[str, torch.Tensor]:
        """This rank's rows of every slot (what it holds between the layers' gathers)."""
        return {n: dist.local_tensor(getattr(box, attr)) for n, (box, attr) in self.slot.items()}

    def shared_rows(self, u_local: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The slots' rows to use in place of ``u_local``'s own copies, where the dtypes agree (float32 weights;
        bf16 weights keep a float32 u for φ_param and a bf16 copy for the gathers)."""
        return {n: t for n, t in self.local_shards().items() if t.dtype == u_local[n].dtype}

    @torch.no_grad()
    def load(self, u_local: Mapping[str, torch.Tensor]) -> None:
        """Write this rank's rows of u (shaped like the parameters' local shards) into the slots."""
        for n, (box, attr) in self.slot.items():
            dist.local_tensor(getattr(box, attr)).copy_(u_local[n])


def is_slot(name: str) -> bool:
    """Whether a ``named_parameters`` name is a u slot (not a model parameter)."""
    return f"{SLOTS}." in name


def shard_for_scoring(model: torch.nn.Module, row_names: list[str]) -> DirectionSlots:
    """Add u slots for ``row_names`` (the parameters φ_data sums over) and ``fully_shard`` the model."""
    slots = DirectionSlots(model, row_names)
    shard_model(model)
    return slots


def load_local_rows(path: str | Path, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's rows of every tensor of the safetensors file ``path`` named in ``like`` (sharded
    parameters), read as row slices: no rank reads the whole file. Names missing from the file are left out."""
    rank, world = dist.rank(), dist.world_size()
    out = {}
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
        for n, p in like.items():
            if n not in stored:
                continue
            start, end = local_rows(p.shape[0], rank, world)
            out[n] = f.get_slice(n)[start:end].to(dist.local_tensor(p).device)
    return out


def gather_whole(local: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: whole tensor} on rank 0 ({} elsewhere) from every rank's rows (``local``, shaped like the local
    shards of the sharded parameters ``like``), one tensor at a time. A collective: every rank calls it."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, t in local.items():
        p = like[n]
        whole = DTensor.from_local(t.contiguous(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        full = full_on_main(whole)
        if full is not None:
            out[n] = full
    return out
