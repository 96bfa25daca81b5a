"""SparseAdamW against its oracle (dense AdamW with gradient masking), and its memory contract."""

from __future__ import annotations

import pytest
import torch
from train_helpers import MODELS, fresh, random_mask, toy_examples

from dualsft.losses import per_example_loss
from dualsft.training.loop import TrainSettings, train_restricted
from dualsft.training.optim import SparseAdamW, adamw_update_


def _train(arch: str, method: str, mask_frac: float, **kw) -> tuple[dict, dict, dict]:
    model = fresh(arch, torch.float64)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = random_mask(model, mask_frac, skip=("wpe",))  # GPT-2 positions left out: a fully frozen tensor
    exs, pad = toy_examples(10)
    st = TrainSettings(method=method, lr=1e-2, batch_size=5, micro_batch_size=2, epochs=2, progress=False, **kw)
    train_restricted(model, exs, mask, st, pad)
    return base, {n: p.detach().clone() for n, p in model.named_parameters()}, mask


@pytest.mark.parametrize("wd,clip", [(0.0, 0.0), (0.1, 0.3)])
@pytest.mark.parametrize("arch", list(MODELS))
def test_sparse_equals_dense_masked_reference(arch: str, wd: float, clip: float) -> None:
    """4 steps of 3 micro-batches (2+2+1 examples) each; float64; relative error of the CHANGE θ−θ0."""
    base, sparse, mask = _train(arch, "sparse", 0.2, weight_decay=wd, max_grad_norm=clip)
    _, ref, _ = _train(arch, "dense-masked", 0.2, weight_decay=wd, max_grad_norm=clip)
    moved = 0
    for n in base:
        change_ref = ref[n] - base[n]
        err = (sparse[n] - ref[n]).norm() / change_ref.norm().clamp_min(1e-300)
        assert change_ref.norm() == 0 or err <= 1e-6, (n, float(err))
        moved += int(change_ref.ne(0).sum())
    assert moved > 0.5 * sum(v.numel() for v in mask.values())


@pytest.mark.parametrize("arch", ["llama-tied", "gpt2-untied"])
def test_outside_mask_bit_identical(arch: str) -> None:
    base, sparse, mask = _train(arch, "sparse", 0.1, weight_decay=0.1)
    for n, p0 in base.items():
        keep = torch.zeros(p0.numel(), dtype=torch.bool)
        if n in mask:
            keep[mask[n].long()] = True
        assert torch.equal(sparse[n].view(-1)[~keep], p0.view(-1)[~keep]), n


def test_no_gradient_for_unselected_and_no_dense_grad_survives() -> None:
    """Unselected tensors: requires_grad False. Selected: p.grad is freed by the hook as soon as it is
    complete, so when any hook runs no other dense gradient is alive (tied weight included)."""
    model = fresh("llama-tied")
    mask = random_mask(model, 0.1, skip=("layers.1.", "norm"))
    exs, pad = toy_examples(6)
    seen: dict[str, object] = {"calls": 0, "alive": 0, "flags": None}

    def count_alive(_p: torch.Tensor) -> None:
        seen["alive"] = max(seen["alive"], sum(q.grad is not None for q in model.parameters()))

    def loss_fn(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        if seen["calls"] == 0:  # SparseAdamW has registered its hooks; ours run after them
            seen["flags"] = {n: p.requires_grad for n, p in m.named_parameters()}
            for p in m.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(count_alive)
        assert all(p.grad is None for p in m.parameters())
        seen["calls"] += 1
        return per_example_loss(m, batch)

    st = TrainSettings(method="sparse", lr=1e-3, batch_size=3, micro_batch_size=2, epochs=1, progress=False)
    train_restricted(model, exs, mask, st, pad, loss_fn=loss_fn)
    flags = seen["flags"]
    assert {n for n, f in flags.items() if f} == set(mask)
    assert seen["calls"] == 4 and seen["alive"] == 0
    assert all(p.grad is None for p in model.parameters())


def test_bf16_weights_keep_float32_masters() -> None:
    """bf16 weights: masters [k] float32 accumulate updates too small for bf16; outside entries untouched."""
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    p0 = p.detach().clone()
    idx = torch.tensor([1, 5, 9], dtype=torch.int32)
    opt = SparseAdamW([("w", p)], {"w": idx}, lr=1e-4)
    assert opt.state[p]["master"].dtype == torch.float32
    for _ in range(3):
        (p.float() ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    master = opt.state[p]["master"]
    assert torch.equal(p.detach()[idx.long()], master.to(torch.bfloat16))
    assert not torch.equal(master, p0[idx.long()].float())  # 3e-4 moves are below bf16 resolution at |w|~1
    keep = torch.ones(64, dtype=torch.bool)
    keep[idx.long()] = False
    assert torch.equal(p.detach()[keep], p0[keep])
    assert opt.state_bytes() == {"moments": 24, "grad_accumulators": 12, "masters": 12, "indices": 12}


def test_adamw_update_matches_torch() -> None:
    torch.manual_seed(0)
    w = torch.randn(50, dtype=torch.float64)
    ref = torch.nn.Parameter(w.clone())
    topt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.05)
    m, v, vals = torch.zeros_like(w), torch.zeros_like(w), w.clone()
    for step in range(1, 6):
        g = torch.randn(50, dtype=torch.float64)
        ref.grad = g.clone()
        topt.step()
        adamw_update_(vals, g, m, v, step, 0.01, (0.9, 0.999), 1e-8, 0.05)
    assert torch.allclose(vals, ref.detach(), rtol=0, atol=1e-15)
