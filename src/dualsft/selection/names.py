"""Where a parameter sits: its transformer layer and its module group (for quotas and the heat-map).

Groups (docs/method.md §5 step 4): ``q k v o gate up down other``, plus ``qkv`` for FUSED query/key/value
projections (GPT-2 ``attn.c_attn``, Phi-3 ``qkv_proj``, Falcon ``query_key_value``). A group is a
property of a whole parameter tensor, so a fused tensor is not split into q/k/v: it is its own group,
and the module quota spreads over the groups a model actually has (GPT-2: qkv, o, up, down, other).

Resolution, by the module that owns the parameter (the name without ``.weight``/``.bias``):
    Llama / Mistral / Qwen2 / Gemma   model.layers.N.self_attn.{q,k,v,o}_proj   -> q k v o
                                      model.layers.N.mlp.{gate,up,down}_proj    -> gate up down
    Mixtral experts                   ...experts.E.w1 / w3 / w2                 -> gate up down
    GPT-2                             transformer.h.N.attn.c_attn               -> qkv
                                      transformer.h.N.attn.c_proj               -> o
                                      transformer.h.N.mlp.c_fc / mlp.c_proj      -> up / down
    norms, embeddings, lm_head, biases of norms, anything unrecognised           -> other
Layer index: the number after a container named ``layers``, ``h``, ``blocks``, ``block`` or ``layer``
(``model.layers.12.mlp...`` -> 12). FALLBACK for unknown architectures: the first purely numeric
segment of the name, else None (not in a transformer layer: embeddings, final norm, head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GROUPS: tuple[str, ...] = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "other")

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_ANY_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")

# Module (last segment before weight/bias) -> group. Context-free names first.
_LEAF: dict[str, str] = {
    "q_proj": "q", "query": "q", "wq": "q", "q": "q",
    "k_proj": "k", "key": "k", "wk": "k", "k": "k",
    "v_proj": "v", "value": "v", "wv": "v", "v": "v",
    "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "Wqkv": "qkv", "qkv": "qkv",
    "o_proj": "o", "out_proj": "o", "wo": "o", "o": "o",
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "c_fc": "up", "fc1": "up", "w3": "up", "dense_h_to_4h": "up",
    "down_proj": "down", "fc2": "down", "w2": "down", "dense_4h_to_h": "down",
}
# Names whose meaning depends on the parent module (GPT-2 has c_proj in attn AND in mlp).
_ATTN_PARENTS = ("attn", "self_attn", "attention", "self_attention", "SelfAttention")
_MLP_PARENTS = ("mlp", "feed_forward", "ffn", "DenseReluDense")


@dataclass(frozen=True)
class ParamLocation:
    """Layer index (None outside transformer layers) and module group (one of GROUPS)."""

    layer: int | None
    group: str


def layer_of(name: str) -> int | None:
    """Transformer layer index of a parameter name, or None (see the module docstring for the fallback)."""
    m = _LAYER.search(name) or _ANY_NUMBER.search(name)
    return int(m.group(1)) if m else None


def group_of(name: str) -> str:
    """Module group of a parameter name (one of GROUPS; ``other`` when unrecognised)."""
    parts = name.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        parts = parts[:-1]
    leaf = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    if leaf in ("c_proj", "dense"):
        if parent in _ATTN_PARENTS:
            return "o"
        if parent in _MLP_PARENTS:
            return "down"
        return "other"
    if "norm" in leaf.lower() or leaf.startswith("ln"):
        return "other"
    return _LEAF.get(leaf, "other")


def locate(name: str) -> ParamLocation:
    """(layer, group) of a parameter name, e.g. ``model.layers.3.self_attn.q_proj.weight`` -> (3, "q")."""
    return ParamLocation(layer_of(name), group_of(name))


def locate_all(names: list[str]) -> dict[str, ParamLocation]:
    """``locate`` for every name."""
    return {n: locate(n) for n in names}
