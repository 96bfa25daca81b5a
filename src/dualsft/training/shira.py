"""A trained SparseDelta as a peft SHiRA adapter (docs/export.md).

peft's SHiRA stores, per adapted ``nn.Linear`` of shape [out, in], ``shira_indices`` [2, n] (row, column)
and ``shira_weight`` [n] (the change θ − θ0 at those entries), with n = r·(in + out) for ONE r shared by
every layer. A DualSFT delta has a different count k_l per tensor, so:

    r = max_l ceil(k_l / (in_l + out_l))         the smallest r with k_l ≤ r·(in_l + out_l) for every l
    padding_l = r·(in_l + out_l) − k_l           extra entries NOT in the delta, carrying θ − θ0 = 0

The padding is exact: SHiRA adds its sparse tensor to the base weight, and w + 0.0 == w for every
finite w, so a padded entry leaves θ0 as it was. The lowest flat indices outside the delta are used
(deterministic). peft also refuses r·(in + out) > in·out, so a layer too small for the shared r cannot
be adapted (it is refused, or kept in the dualsft rest file with ``partial``).

Public API: ``ShiraPlan``, ``plan_shira``, ``shira_rank``, ``pad_indices``, ``layer_delta``,
``build_shira_adapter``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dualsft.errors import ArtifactError, ExportError
from dualsft.training.delta import SparseDelta


@dataclass
class ShiraPlan:
    """What goes into the adapter.

    Attributes:
        r: SHiRA's shared r (entries per layer = r·(in + out)).
        layers: {parameter name (``<module>.weight``): module name} of the adapted nn.Linear weights.
        counts: {parameter name: k_l, the delta's entries in it}.
        sizes: {parameter name: (out, in)}.
        left_out: {parameter name: why SHiRA cannot hold it} (the rest; empty unless ``partial``).
    """

    r: int
    layers: dict[str, str]
    counts: dict[str, int]
    sizes: dict[str, tuple[int, int]]
    left_out: dict[str, str] = field(default_factory=dict)

    def entries(self, name: str) -> int:
        """r·(in + out): SHiRA's entry count for the layer of ``name``."""
        return self.r * sum(self.sizes[name])


def tensor_owners(model: torch.nn.Module) -> dict[int, list[tuple[str, torch.nn.Module, str]]]:
    """{id(parameter): [(module name, module, attribute)]}; tied weights have several owners."""
    owners: dict[int, list[tuple[str, torch.nn.Module, str]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, mod, attr))
    return owners


def why_not_shira(owners: list[tuple[str, torch.nn.Module, str]]) -> str | None:
    """None if SHiRA can hold the tensor (the weight of exactly one nn.Linear), else the reason."""
    if len(owners) > 1:
        return "tied weight shared by " + " and ".join(f"{m}.{a}" for m, _, a in owners) + " (SHiRA adapts one layer)"
    mname, mod, attr = owners[0]
    if isinstance(mod, torch.nn.Linear) and attr == "weight":
        return None
    kind = "embedding" if isinstance(mod, torch.nn.Embedding) else f"{type(mod).__name__}.{attr}"
    return f"{kind}: SHiRA holds nn.Linear weights only"


def shira_rank(counts: dict[str, int], sizes: dict[str, tuple[int, int]]) -> int:
    """The smallest r ≥ 1 with counts[l] ≤ r·(out_l + in_l) for every layer l."""
    return max([1, *(math.ceil(k / sum(sizes[n])) for n, k in counts.items())])


def too_small(r: int, sizes: dict[str, tuple[int, int]]) -> list[str]:
    """Layers peft refuses at this r: r·(in + out) > in·out."""
    return sorted(n for n, (o, i) in sizes.items() if r * (o + i) > o * i)


def plan_shira(delta: SparseDelta, model: torch.nn.Module, partial: bool = False) -> ShiraPlan:
    """Which delta tensors SHiRA holds, and r.

    Without ``partial``, any tensor it cannot hold raises ExportError listing them all (``.tensors``).
    With ``partial``, they are ``left_out``; a Linear too small for the common r is left out too and r
    recomputed over the others (it can only shrink, so they still fit).
    """
    params = dict(model.named_parameters())
    owners = tensor_owners(model)
    missing = sorted(n for n in delta.values if n not in params)
    if missing:
        raise ArtifactError(f"the delta names parameters this model does not have: {missing[:5]}; it was trained "
                            "from another model: pass the training run's base model")
    layers: dict[str, str] = {}
    left: dict[str, str] = {}
    for n in sorted(delta.values):
        why = why_not_shira(owners[id(params[n])])
        if why is None:
            layers[n] = n.rsplit(".", 1)[0]
        else:
            left[n] = why
    counts = {n: delta.values[n].numel() for n in layers}
    sizes = {n: tuple(params[n].shape) for n in layers}
    r = shira_rank(counts, sizes)
    for n in too_small(r, sizes):
        left[n] = (f"nn.Linear {sizes[n]} too small for the shared r={r}: r·(in+out) = {r * sum(sizes[n])} "
                   f"> in·out = {math.prod(sizes[n])} (peft's limit)")
    if left and not partial:
        listed = "; ".join(f"{n} ({w})" for n, w in left.items())
        raise ExportError(f"SHiRA cannot hold {len(left)} tensor(s) of this delta: {listed}. Pass --partial to "
                          "export the rest beside the adapter as dualsft_rest.safetensors, or train with "
                          "--include over nn.Linear weights only", left)
    for n in left:
        layers.pop(n, None)
    if not layers:
        raise ExportError("no tensor of this delta is an nn.Linear weight SHiRA can hold; nothing to export as "
                          "SHiRA (use the delta itself: dualsft merge or apply_delta)", left)
    counts = {n: counts[n] for n in layers}
    sizes = {n: sizes[n] for n in layers}
    return ShiraPlan(shira_rank(counts, sizes), layers, counts, sizes, left)


def pad_indices(idx: torch.Tensor, numel: int, need: int) -> torch.Tensor:
    """The sorted flat indices ``idx`` [k] plus the (need − k) lowest indices not in it -> sorted [need] int64."""
    taken = torch.zeros(numel, dtype=torch.bool)
    taken[idx.to(torch.int64)] = True
    free = torch.nonzero(~taken).flatten()[: need - idx.numel()]
    taken[free] = True
    return torch.nonzero(taken).flatten()


def layer_delta(base: torch.Tensor, idx: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """θ − θ0 as a dense flat tensor [numel] in ``base``'s dtype (zero outside the delta).

    ``base`` is θ0's weight, ``idx`` [k] the delta's flat indices (None: dense), ``values`` the NEW weights.
    The difference is taken in float64 so that it is rounded once, into the weight dtype."""
    flat = base.detach().reshape(-1).to("cpu", torch.float64)
    out = torch.zeros_like(flat)
    if idx is None:
        out = values.reshape(-1).to(torch.float64) - flat
    else:
        pos = idx.to(torch.int64)
        out[pos] = values.to(torch.float64) - flat[pos]
    return out.to(base.dtype)


def build_shira_adapter(model: torch.nn.Module, delta: SparseDelta, plan: ShiraPlan) -> torch.nn.Module:
    """Wrap ``model`` (θ0, modified in place) in a peft SHiRA adapter holding the planned part of ``delta``.

    Each layer's mask is the delta's indices padded to r·(in + out); its ``shira_weight`` is θ − θ0 read
    at peft's own ``shira_indices`` (so the order peft chose does not matter). Returns the PeftModel."""
    from peft import ShiraConfig, get_peft_model

    params = dict(model.named_parameters())
    by_weight = {id(params[n]): n for n in plan.layers}
    diffs = {n: layer_delta(params[n], delta.indices.get(n), delta.values[n]) for n in plan.layers}

    def mask_fn(base_layer: torch.nn.Module, r: int, **_: object) -> torch.Tensor:
        w = base_layer.weight
        n = by_weight[id(w)]
        idx = delta.indices.get(n)
        idx = torch.arange(w.numel()) if idx is None else idx
        keep = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
        keep[pad_indices(idx, w.numel(), plan.entries(n)).to(w.device)] = 1
        return keep.view(w.shape)

    config = ShiraConfig(r=plan.r, target_modules=sorted(plan.layers.values()))
    config.mask_fn = mask_fn  # peft's documented hook for a custom mask; the saved config says "random",
    peft_model = get_peft_model(model, config)  # which on load is replaced by the saved shira_indices
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for n, mname in plan.layers.items():
            layer = modules[mname]
            rows, cols = layer.shira_indices["default"].to(torch.int64)  # [2, n] -> [n], [n]
            weight = layer.shira_weight["default"]
            weight.copy_(diffs[n][rows * layer.in_features + cols].to(weight.device, weight.dtype))
    return peft_model
