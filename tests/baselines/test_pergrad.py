"""Batched per-example layer gradients (hooks, one layer at a time) == one backward per example."""

from __future__ import annotations

import pytest
import torch

from dualsft.baselines.pergrad import backward_per_example, linear_layers, per_example_grads_loop
from dualsft.testing import micro_gpt2, micro_llama


# Tolerance relative to the largest entry. GPT-2 runs fully in float64: exact to summation order (measured
# 5e-16). HF Llama's eager attention takes its softmax in float32 even in a float64 model
# (modeling_llama: softmax(..., dtype=torch.float32)), and the oracle's unpadded rows are reduced in a
# different order than the padded batch's: measured 1.6e-8, so 1e-7 there.
@pytest.mark.parametrize("build,tied,tol", [(micro_llama, True, 1e-7), (micro_llama, False, 1e-7),
                                            (micro_gpt2, True, 1e-12)])
def test_batched_equals_loop_float64(make_batches, build, tied, tol):
    model = build(tied=tied, seed=3, dtype=torch.float64)
    batch = make_batches(5, seed=4, batch_size=5)[0]  # varied lengths -> right padding
    assert batch["attention_mask"].min() == 0
    layers = linear_layers(model)
    names = [n for ly in layers for n in (ly.weight, ly.bias) if n]
    got: dict[str, torch.Tensor] = {}
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    backward_per_example(model, inputs, layers, lambda n, g: got.__setitem__(n, g.clone()))
    want = per_example_grads_loop(model, inputs, names)
    assert set(got) == set(names)
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=tol * want[n].abs().max().item())
    assert all(p.requires_grad for p in model.parameters())  # the pass unfreezes what it froze


def test_layers_exclude_head_and_embeddings():
    for model in (micro_llama(tied=True), micro_llama(tied=False), micro_gpt2(tied=True)):
        names = {n for ly in linear_layers(model) for n in (ly.weight, ly.bias) if n}
        assert names and not any("embed" in n or "lm_head" in n or "wte" in n or "wpe" in n for n in names)
    untied = micro_llama(tied=False)
    assert "lm_head.weight" in {ly.weight for ly in linear_layers(untied, include_head=True)}
