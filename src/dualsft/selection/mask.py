"""The saved mask format and helpers to apply it in any training loop.

``mask.safetensors`` holds, per parameter name (as in ``model.named_parameters()``, tied weights once),
a 1-D tensor of SORTED flat indices into ``param.view(-1)`` of the selected entries: int32 when the
tensor has fewer than 2**31 entries, else int64. A parameter with no selected entry is absent.
Safetensors metadata: ``{"format": "dualsft-mask-v1", "shapes": json {name: shape}}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch

from dualsft.errors import ArtifactError
from dualsft.io import load_tensors, save_tensors

MASK_FORMAT = "dualsft-mask-v1"


def compact_indices(flat_idx: torch.Tensor, numel: int, presorted: bool = False) -> torch.Tensor:
    """Sorted flat indices in the smallest safe integer type (int32 below 2**31 entries).

    ``presorted=True`` skips the sort for indices already ascending (e.g. from ``torch.nonzero``)."""
    idx = flat_idx.flatten().to(torch.int64)
    idx = idx if presorted else torch.sort(idx).values
    return idx.to(torch.int32) if numel < 2**31 else idx


def dense_to_indices(mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: bool mask shaped like the weight} -> {name: sorted compact flat indices} (empty ones dropped)."""
    out = {}
    for name, m in mask.items():
        idx = torch.nonzero(m.flatten(), as_tuple=False).flatten()
        if idx.numel():
            out[name] = compact_indices(idx, m.numel())
    return out


def indices_to_dense(idx: torch.Tensor, shape: tuple[int, ...] | torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sorted flat indices -> bool mask of ``shape``."""
    m = torch.zeros(int(torch.Size(shape).numel()), dtype=torch.bool, device=device)
    m[idx.to(device=device, dtype=torch.int64)] = True
    return m.view(shape)


def save_mask(path: str | os.PathLike, indices: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Write the mask (indices per parameter) with the shapes it applies to."""
    meta = {"format": MASK_FORMAT, "shapes": json.dumps({k: list(v) for k, v in shapes.items()})}
    save_tensors(path, dict(indices), metadata=meta)


def load_mask(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """Read a mask: ({name: int64 sorted flat indices}, {name: shape of the full parameter})."""
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != MASK_FORMAT:
        raise ArtifactError(f"{path} is not a dualsft mask (format {meta.get('format')!r})")
    shapes = {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()}
    return {k: v.to(torch.int64) for k, v in tensors.items()}, shapes


def check_mask_matches(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], source: str = "") -> None:
    """Refuse a mask made for another architecture: every name must exist with the same shape.

    ``source`` (e.g. the mask file) prefixes the message."""
    params = dict(model.named_parameters())
    where = f"{source}: " if source else ""
    fix = "; it was made for another model: rerun `dualsft select` for this one"
    for name, shape in shapes.items():
        if name not in params:
            raise ArtifactError(f"{where}mask names parameter {name!r}, which this model does not have{fix}")
        if tuple(params[name].shape) != tuple(shape):
            raise ArtifactError(f"{where}mask shape for {name!r} is {tuple(shape)}, the model's is "
                                f"{tuple(params[name].shape)}{fix}")


def apply_mask_to_grads(model: torch.nn.Module, indices: dict[str, torch.Tensor]) -> None:
    """For use in your own loop, after backward(): zero every gradient entry outside the mask.

    Parameters absent from the mask get ``grad = None``. (This is the simple, dense way: it saves no
    memory; ``dualsft train`` keeps optimizer state only for the selected entries.)
    """
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if name not in indices:
            p.grad = None
            continue
        keep = indices_to_dense(indices[name], p.shape, p.grad.device)
        p.grad.mul_(keep)


def shira_mask_fn(model: torch.nn.Module, indices: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A mask function for peft's SHiRA (``ShiraConfig.mask_fn``) that returns a saved mask's entries.

    SHiRA calls ``mask_fn(base_layer, r, **kwargs)`` once per targeted nn.Linear and needs back a 0/1
    tensor shaped like ``base_layer.weight`` (same dtype and device) with EXACTLY r*(in+out) ones. The
    layer is recognised by its weight tensor; a targeted layer whose mask has another count, or that the
    mask does not cover, raises ValueError naming it (see docs/selection.md: most DualSFT masks do not
    have SHiRA's fixed per-layer count, so use this for masks built to that count, e.g. with
    ``--include`` over the targeted modules and a per-layer budget).
    """
    by_weight = {id(p): n for n, p in model.named_parameters()}

    def mask_fn(base_layer: torch.nn.Module, r: int, **_: object) -> torch.Tensor:
        w = base_layer.weight
        name = by_weight.get(id(w))
        need = r * sum(w.shape)
        if name is None or name not in indices:
            raise ValueError(f"the DualSFT mask selects nothing in SHiRA's target layer {name or base_layer!r}; "
                             "leave it out of target_modules")
        got = int(indices[name].numel())
        if got != need:
            raise ValueError(f"SHiRA needs exactly r*(in+out) = {need} entries in {name}, the mask has {got}")
        return indices_to_dense(indices[name], w.shape, w.device).to(w.dtype)

    return mask_fn
