"""A SparseDelta as a peft SHiRA adapter: the r / padding rule, exactness against dualsft's own merge,
and what SHiRA cannot hold (tied and embedding weights, norms, Conv1D, layers too small for r)."""

from __future__ import annotations

import copy

import pytest
import torch
from train_helpers import fresh, random_mask

from dualsft.errors import ArtifactError, ExportError
from dualsft.models import model_fingerprint
from dualsft.training.delta import extract_delta, write_delta_
from dualsft.training.shira import build_shira_adapter, pad_indices, plan_shira, shira_rank


def trained_delta(base: torch.nn.Module, mask: dict[str, torch.Tensor], seed: int = 1):
    """A delta that moves every masked entry (as training would), and the tuned model."""
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if n in mask:
                p.view(-1)[mask[n].long()] += 0.05 * torch.randn(mask[n].numel(), generator=g, dtype=p.dtype)
    return extract_delta(tuned, mask, base_model="micro", base_fingerprint=model_fingerprint(base)), tuned


def linear_mask(model: torch.nn.Module, frac: float = 0.1) -> dict[str, torch.Tensor]:
    return random_mask(model, frac, skip=("norm", "embed"))


def test_rank_is_the_smallest_that_holds_every_layer() -> None:
    sizes = {"a": (32, 32), "b": (16, 32), "c": (64, 32)}
    assert shira_rank({"a": 64, "b": 48, "c": 96}, sizes) == 1
    assert shira_rank({"a": 65, "b": 1, "c": 1}, sizes) == 2  # 65 > 1·64
    assert shira_rank({"a": 1, "b": 1, "c": 97}, sizes) == 2  # 97 > 1·96
    assert shira_rank({}, sizes) == 1


def test_padding_adds_the_lowest_free_entries() -> None:
    idx = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    out = pad_indices(idx, 12, 7)
    assert out.tolist() == [0, 1, 2, 3, 4, 5, 9]
    assert pad_indices(idx, 12, 4).tolist() == [0, 3, 4, 9]


def test_plan_counts_and_padding_on_untied_llama() -> None:
    base = fresh("llama-untied")
    mask = linear_mask(base, 0.1)
    delta, _ = trained_delta(base, mask)
    plan = plan_shira(delta, base)
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    assert set(plan.layers) == set(mask) and "lm_head.weight" in plan.layers and not plan.left_out
    want_r = max(-(-mask[n].numel() // sum(shapes[n])) for n in mask)
    assert plan.r == want_r
    for n in mask:
        assert plan.entries(n) == want_r * sum(shapes[n]) >= plan.counts[n] == mask[n].numel()
        assert plan.layers[n] == n.removesuffix(".weight")


@pytest.mark.parametrize("load", ["forward", "merge_and_unload"])
def test_adapter_reproduces_the_delta(tmp_path, load) -> None:
    """Saved with peft, loaded with PeftModel.from_pretrained: logits equal dualsft's merged model."""
    from peft import PeftModel

    base = fresh("llama-untied")
    delta, _ = trained_delta(base, linear_mask(base, 0.1))
    plan = plan_shira(delta, base)
    build_shira_adapter(copy.deepcopy(base), delta, plan).save_pretrained(str(tmp_path), save_embedding_layers=False)
    merged = copy.deepcopy(base)
    write_delta_(merged, delta)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids = torch.randint(0, 259, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if load == "merge_and_unload":
            peft_model = peft_model.merge_and_unload()
            weights = dict(peft_model.named_parameters())
            for n, p in merged.named_parameters():
                assert torch.allclose(weights[n], p, rtol=0, atol=1e-7), n
        got, want = peft_model(ids).logits, merged(ids).logits
    assert (got - want).abs().max().item() <= 1e-6


def test_padding_entries_carry_zero_change(tmp_path) -> None:
    base = fresh("llama-untied")
    delta, _ = trained_delta(base, linear_mask(base, 0.02))
    plan = plan_shira(delta, base)
    peft_model = build_shira_adapter(copy.deepcopy(base), delta, plan)
    modules = dict(peft_model.base_model.model.named_modules())
    for n, mname in plan.layers.items():
        layer = modules[mname]
        rows, cols = layer.shira_indices["default"].long()
        flat = rows * layer.in_features + cols
        padded = ~torch.isin(flat, delta.indices[n].long())
        assert int(padded.sum()) == plan.entries(n) - plan.counts[n] > 0
        assert torch.count_nonzero(layer.shira_weight["default"][padded]) == 0


def test_tied_embedding_norms_are_refused_and_partial_leaves_them_out() -> None:
    base = fresh("llama-tied")
    delta, _ = trained_delta(base, random_mask(base, 0.1))
    with pytest.raises(ExportError, match="--partial") as e:
        plan_shira(delta, base)
    assert "tied weight shared by" in e.value.tensors["model.embed_tokens.weight"]
    assert "lm_head" in e.value.tensors["model.embed_tokens.weight"]
    assert "LlamaRMSNorm.weight" in e.value.tensors["model.norm.weight"]
    plan = plan_shira(delta, base, partial=True)
    assert set(plan.left_out) == set(e.value.tensors)
    assert set(plan.layers) | set(plan.left_out) == set(delta.values)
    assert all("norm" not in n and "embed" not in n for n in plan.layers)


def test_untied_embedding_is_refused_as_embedding() -> None:
    base = fresh("llama-untied")
    delta, _ = trained_delta(base, random_mask(base, 0.1, skip=("norm",)))
    with pytest.raises(ExportError) as e:
        plan_shira(delta, base)
    assert set(e.value.tensors) == {"model.embed_tokens.weight"}
    assert e.value.tensors["model.embed_tokens.weight"].startswith("embedding")


def test_a_layer_too_small_for_the_shared_r_is_refused() -> None:
    """A dense (full fine-tuning) q_proj 32x32 needs r = 1024/64 = 16; k_proj 16x32 holds at most r = 10."""
    base = fresh("llama-untied")
    numel = {n: p.numel() for n, p in base.named_parameters()}
    mask = {n: torch.arange(numel[n], dtype=torch.int32) for n in ("model.layers.0.self_attn.q_proj.weight",)}
    mask["model.layers.0.self_attn.k_proj.weight"] = torch.arange(0, 512, 7, dtype=torch.int32)
    delta, _ = trained_delta(base, mask)
    delta.indices["model.layers.0.self_attn.q_proj.weight"] = None  # stored densely, as full fine-tuning does
    delta.values["model.layers.0.self_attn.q_proj.weight"] = delta.values["model.layers.0.self_attn.q_proj.weight"].view(32, 32)
    with pytest.raises(ExportError, match="too small for the shared r=16"):
        plan_shira(delta, base)
    plan = plan_shira(delta, base, partial=True)
    assert plan.r == 16 and list(plan.left_out) == ["model.layers.0.self_attn.k_proj.weight"]
    peft_model = build_shira_adapter(copy.deepcopy(base), delta, plan)
    merged = copy.deepcopy(base)
    write_delta_(merged, delta)
    got = dict(peft_model.merge_and_unload().named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(got, dict(merged.named_parameters())["model.layers.0.self_attn.q_proj.weight"], atol=1e-7)


def test_gpt2_conv1d_has_nothing_shira_can_hold() -> None:
    """GPT-2's blocks are Conv1D (not nn.Linear); its only nn.Linear, lm_head, is tied to wte."""
    base = fresh("gpt2-tied")
    delta, _ = trained_delta(base, random_mask(base, 0.1))
    with pytest.raises(ExportError, match="no tensor of this delta") as e:
        plan_shira(delta, base, partial=True)
    assert any("Conv1D.weight" in why for why in e.value.tensors.values())


def test_a_delta_for_another_model_is_an_artifact_error() -> None:
    delta, _ = trained_delta(fresh("gpt2-untied"), {"transformer.h.0.attn.c_attn.weight": torch.tensor([0, 1])})
    with pytest.raises(ArtifactError, match="does not have"):
        plan_shira(delta, fresh("llama-untied"))
