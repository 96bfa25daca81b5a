"""Which parameters are the transformer's linear maps: the LESS baseline's featurised layers and the
``--score.data-params linear`` restriction of φ_data (docs/method.md §4 "Scoring variants") use this one rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dualsft.scoring.ghost import module_kind


@dataclass(frozen=True)
class Layer:
    """One featurised layer: its module, kind ('linear' | 'conv1d') and parameter names (None if frozen)."""

    module_name: str
    module: torch.nn.Module
    kind: str
    weight: str | None
    bias: str | None


def linear_layers(model: torch.nn.Module, include_head: bool = False) -> list[Layer]:
    """Linear / Conv1D layers that own a trainable parameter, in module order.

    The output head (``model.get_output_embeddings()``) is excluded unless ``include_head``; a head whose
    weight is tied to an embedding is always excluded (its per-example gradient has an embedding term).
    """
    names = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = []
    for mname, mod in model.named_modules():
        kind = module_kind(mod)  # the ghost scorer's classification: one rule for both uses of the capture
        if kind not in ("linear", "conv1d"):
            continue
        if id(mod.weight) in emb_ids or (mod is head and not include_head):
            continue
        w = names[id(mod.weight)] if mod.weight.requires_grad else None
        b = mod.bias if isinstance(getattr(mod, "bias", None), torch.Tensor) else None
        bname = names[id(b)] if b is not None and b.requires_grad else None
        if w or bname:
            layers.append(Layer(mname, mod, kind, w, bname))
    return layers


def linear_weight_names(model: torch.nn.Module) -> list[str]:
    """Parameter names of the linear layers' weights and biases (``linear_layers``: no embedding, no output
    head, no norm), in module order."""
    return [n for layer in linear_layers(model) for n in (layer.weight, layer.bias) if n]
