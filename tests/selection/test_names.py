"""Layer and module-group resolution for the supported families and the documented fallback."""

from __future__ import annotations

import pytest

from dualsft.selection.names import GROUPS, ParamLocation, locate
from dualsft.testing import micro_gpt2, micro_llama


@pytest.mark.parametrize("name, layer, group", [
    ("model.layers.3.self_attn.q_proj.weight", 3, "q"),       # Llama / Mistral / Qwen2 / Gemma
    ("model.layers.3.self_attn.k_proj.bias", 3, "k"),         # Qwen2 has q/k/v biases
    ("model.layers.12.self_attn.v_proj.weight", 12, "v"),
    ("model.layers.0.self_attn.o_proj.weight", 0, "o"),
    ("model.layers.7.mlp.gate_proj.weight", 7, "gate"),
    ("model.layers.7.mlp.up_proj.weight", 7, "up"),
    ("model.layers.7.mlp.down_proj.weight", 7, "down"),
    ("model.layers.7.input_layernorm.weight", 7, "other"),
    ("model.layers.2.self_attn.q_norm.weight", 2, "other"),   # Gemma3 / Qwen3 q/k norms
    ("model.layers.1.block_sparse_moe.experts.5.w1.weight", 1, "gate"),  # Mixtral experts
    ("model.layers.1.block_sparse_moe.experts.5.w2.weight", 1, "down"),
    ("model.layers.1.block_sparse_moe.experts.5.w3.weight", 1, "up"),
    ("model.embed_tokens.weight", None, "other"),
    ("model.norm.weight", None, "other"),
    ("lm_head.weight", None, "other"),
    ("transformer.h.4.attn.c_attn.weight", 4, "qkv"),          # GPT-2: fused q/k/v
    ("transformer.h.4.attn.c_proj.bias", 4, "o"),
    ("transformer.h.4.mlp.c_fc.weight", 4, "up"),
    ("transformer.h.4.mlp.c_proj.weight", 4, "down"),
    ("transformer.h.4.ln_1.weight", 4, "other"),
    ("transformer.wte.weight", None, "other"),
    ("encoder.stack.9.attention.query.weight", 9, "q"),         # unknown container: first number
    ("weird.thing.weight", None, "other"),
])
def test_locate(name, layer, group):
    assert locate(name) == ParamLocation(layer, group)


@pytest.mark.parametrize("build, n_layers", [(micro_llama, 2), (micro_gpt2, 2)])
def test_every_micro_parameter_resolves(build, n_layers):
    locs = {n: locate(n) for n, _ in build().named_parameters()}
    assert {loc.layer for loc in locs.values()} == {None, *range(n_layers)}
    assert all(loc.group in GROUPS for loc in locs.values())
    assert len({loc.group for loc in locs.values()}) >= 5
