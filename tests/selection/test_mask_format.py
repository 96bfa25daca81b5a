"""The saved mask format round-trips, applies in a user's loop, and feeds peft's SHiRA when it fits."""

from __future__ import annotations

import pytest
import torch

from dualsft.selection.mask import apply_mask_to_grads, load_mask, save_mask, shira_mask_fn
from dualsft.selection.policy import MaskSpec, select_mask
from dualsft.testing import micro_llama


def test_round_trip_and_apply_in_own_loop(tmp_path):
    model = micro_llama()
    scores = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    sel = select_mask(scores, MaskSpec(budget=0.05, exclude="embed"))
    save_mask(tmp_path / "m.safetensors", sel.indices, sel.shapes)
    idx, shapes = load_mask(tmp_path / "m.safetensors")
    assert shapes == sel.shapes and all(torch.equal(idx[n], sel.indices[n].long()) for n in sel.indices)
    assert all(v.dtype == torch.int32 for v in sel.indices.values())  # compact on disk
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    apply_mask_to_grads(model, idx)
    opt.step()
    for n, p in model.named_parameters():
        changed = (p.detach() != before[n]).flatten().nonzero().flatten()
        assert set(changed.tolist()) <= set(idx.get(n, torch.zeros(0)).tolist())
    assert not any("embed" in n for n in idx)


def test_shira_mask_fn_exact_count_and_refusals():
    from peft import ShiraConfig, get_peft_model

    model = micro_llama()
    r = 1
    g = torch.Generator().manual_seed(0)
    indices = {}
    for n, p in model.named_parameters():
        if n.endswith("q_proj.weight"):  # exactly r*(in+out) entries, as SHiRA requires
            indices[n] = torch.randperm(p.numel(), generator=g)[: r * sum(p.shape)].sort().values.int()
    cfg = ShiraConfig(r=r, target_modules=["q_proj"])
    cfg.mask_fn = shira_mask_fn(model, indices)
    peft_model = get_peft_model(model, cfg)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    rows, cols = layer.shira_indices["default"]
    got = (rows.long() * layer.in_features + cols.long()).sort().values
    assert torch.equal(got, indices["model.layers.0.self_attn.q_proj.weight"].long())

    model = micro_llama()
    short = {n: v[:-1] for n, v in indices.items()}
    cfg = ShiraConfig(r=r, target_modules=["q_proj"])
    cfg.mask_fn = shira_mask_fn(model, short)
    with pytest.raises(ValueError, match="exactly"):
        get_peft_model(model, cfg)


def test_low_memory_reader_matches_safetensors(tmp_path):
    from dualsft.io import load_tensors, save_tensors
    from dualsft.selection.select import read_safetensors, read_safetensors_shapes

    t = {"a": torch.randn(3, 5), "b.weight": torch.randn(7).to(torch.bfloat16), "c": torch.randn(2, 2).double()}
    save_tensors(tmp_path / "x.safetensors", t, metadata={"what": "test"})
    got = read_safetensors(tmp_path / "x.safetensors")
    ref = load_tensors(tmp_path / "x.safetensors")
    assert set(got) == set(ref) and all(torch.equal(got[n], ref[n]) and got[n].dtype == ref[n].dtype for n in ref)
    assert read_safetensors_shapes(tmp_path / "x.safetensors") == {n: tuple(v.shape) for n, v in t.items()}
