"""SparseAdamW as a torch.optim.Optimizer: bit-identical to a plain sparse AdamW step by step, state_dict
round trips, torch and transformers lr schedulers, param groups, and state that scales with k."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from train_helpers import fresh, random_mask, toy_examples

from dualsft.data.formats import batches
from dualsft.errors import ArtifactError, ConfigError
from dualsft.losses import per_example_loss
from dualsft.training.optim import SparseAdamW, adamw_update_


class PlainSparseAdamW:
    """The ORACLE for bits: sparse AdamW written plainly (no hooks, no param groups, no torch Optimizer).

    After each backward the dense gradient's selected entries are added to a float32 [k] accumulator;
    a step scales them by min(1, max_norm / (‖g_selected‖ + 1e-6)), applies ``adamw_update_`` (pinned to
    torch's AdamW by test_adamw_update_matches_torch) to float32 values [k] and writes them back.
    """

    def __init__(self, model: torch.nn.Module, mask: dict[str, torch.Tensor], weight_decay: float):
        self.sel = {n: (p, mask[n].long()) for n, p in model.named_parameters() if n in mask}
        self.values = {n: p.detach().view(-1)[i].float() for n, (p, i) in self.sel.items()}  # [k] masters
        self.acc = {n: torch.zeros_like(v) for n, v in self.values.items()}
        self.m = {n: torch.zeros_like(v) for n, v in self.values.items()}
        self.v = {n: torch.zeros_like(v) for n, v in self.values.items()}
        self.t, self.wd = 0, weight_decay

    def gather(self) -> None:
        for n, (p, i) in self.sel.items():
            self.acc[n] += p.grad.view(-1)[i].float()
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float, max_norm: float) -> None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a) for a in self.acc.values()]))
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        self.t += 1
        for n, (p, i) in self.sel.items():
            adamw_update_(self.values[n], self.acc[n] * coef, self.m[n], self.v[n], self.t, lr, (0.9, 0.999), 1e-8,
                          self.wd)
            p.view(-1)[i] = self.values[n].to(p.dtype)
            self.acc[n].zero_()


def _backward(model: torch.nn.Module, mb: dict, n: int) -> None:
    (per_example_loss(model, mb).sum() / n).backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_to_the_plain_twin_step_by_step(dtype: torch.dtype) -> None:
    """6 steps of 2 micro-batches, clipping active, weight decay, a transformers schedule; the sparse side
    only ever calls model.zero_grad() (as transformers.Trainer does), never the optimizer's."""
    from transformers import get_linear_schedule_with_warmup

    exs, pad = toy_examples(8)
    micro = batches(exs, 2, pad)
    model = fresh("llama-tied", dtype)
    ref_model = copy.deepcopy(model)
    mask = random_mask(model, 0.2, skip=("layers.1.mlp",))
    opt = SparseAdamW(model.named_parameters(), mask, lr=1e-2, weight_decay=0.1)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)
    ref = PlainSparseAdamW(ref_model, mask, weight_decay=0.1)
    for step in range(6):
        for mb in micro[2 * (step % 2):2 * (step % 2) + 2]:
            _backward(model, mb, 4)
            _backward(ref_model, mb, 4)
            ref.gather()
        lr = opt.param_groups[0]["lr"]
        opt.clip_grad_norm_(0.05)
        opt.step()
        sched.step()
        model.zero_grad()
        ref.step(lr, 0.05)
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert torch.equal(p, q), (step, n)
    assert [opt.state[p]["step"].item() for _, p in opt.named] == [6.0] * len(mask)


def _train(model: torch.nn.Module, opt: SparseAdamW, micro: list[dict], steps: range) -> None:
    for s in steps:
        _backward(model, micro[s % len(micro)], 2)
        opt.clip_grad_norm_(1.0)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_bitwise(dtype: torch.dtype) -> None:
    """3 steps, state_dict through torch.save/torch.load (weights_only), a fresh optimizer on a copy of
    the weights, 3 more steps == 6 uninterrupted steps; bf16 keeps float32 moments and masters."""
    exs, pad = toy_examples(6)
    micro = batches(exs, 2, pad)
    model = fresh("llama-untied", dtype)
    mask = random_mask(model, 0.1)
    straight = copy.deepcopy(model)
    opt_straight = SparseAdamW(straight.named_parameters(), mask, lr=1e-2, weight_decay=0.05)
    _train(straight, opt_straight, micro, range(6))

    opt = SparseAdamW(model.named_parameters(), mask, lr=1e-2, weight_decay=0.05)
    _train(model, opt, micro, range(3))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed = copy.deepcopy(model)
    opt2 = SparseAdamW(resumed.named_parameters(), mask, lr=1e-2, weight_decay=0.05)
    opt2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for _, p in opt2.named:
        st = opt2.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
        assert st["index"].dtype == torch.int32 and st["step"].item() == 3.0
        assert ("master" in st) == (dtype == torch.bfloat16)
    _train(resumed, opt2, micro, range(3, 6))
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n

    other = SparseAdamW(copy.deepcopy(model).named_parameters(), random_mask(model, 0.1, seed=1))
    with pytest.raises(ArtifactError, match="different mask"):
        other.load_state_dict(opt.state_dict())


def _quadratic_pair(schedule) -> tuple[list[float], list[float], torch.Tensor, torch.Tensor]:
    """The same float64 problem under SparseAdamW and masked torch.optim.AdamW, each driven by
    ``schedule(optimizer)``: (lrs sparse, lrs torch, weights sparse, weights torch)."""
    g = torch.Generator().manual_seed(0)
    w0, target = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    idx = torch.randperm(48, generator=g)[:10].sort().values
    keep = torch.zeros(48, dtype=torch.bool)
    keep[idx] = True
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    sparse, dense = SparseAdamW([("w", a)], {"w": idx}, lr=0.1), torch.optim.AdamW([b], lr=0.1, weight_decay=0.0)
    runs = []
    for p, opt in ((a, sparse), (b, dense)):
        sched, lrs = schedule(opt), []
        for _ in range(8):
            ((p - target) ** 4).sum().backward()
            if p is b:
                b.grad.view(-1).mul_(keep)  # the dense-masked way: zero the gradient outside the mask
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            opt.zero_grad()
        runs.append(lrs)
    return runs[0], runs[1], a.detach(), b.detach()


@pytest.mark.parametrize("name", ["constant", "linear_warmup", "cosine_warmup", "torch_lambda", "torch_step"])
def test_lr_schedulers_drive_the_groups(name: str) -> None:
    import transformers

    schedules = {
        "constant": transformers.get_constant_schedule,
        "linear_warmup": lambda o: transformers.get_linear_schedule_with_warmup(o, 2, 8),
        "cosine_warmup": lambda o: transformers.get_cosine_schedule_with_warmup(o, 2, 8),
        "torch_lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5**s),
        "torch_step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.1),
    }
    lrs, ref_lrs, w, ref_w = _quadratic_pair(schedules[name])
    assert lrs == ref_lrs and (len(set(lrs)) == 1) == (name == "constant")
    assert torch.allclose(w, ref_w, rtol=1e-12, atol=1e-15)  # outside the mask: both exactly w0


def test_param_groups_state_scales_with_k_and_needs_names() -> None:
    model = fresh("llama-tied")
    mask = random_mask(model, 0.05, skip=("layers.1.",))
    named = dict(model.named_parameters())
    decay = [(n, p) for n, p in named.items() if n.endswith("proj.weight")]
    rest = [(n, p) for n, p in named.items() if not n.endswith("proj.weight")]
    opt = SparseAdamW([{"params": iter(decay), "weight_decay": 0.1}, {"params": rest, "lr": 0.0}], mask, lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.0]
    assert {n for n, _ in opt.named} == set(mask) and all(p.requires_grad == (n in mask) for n, p in named.items())
    for n, p in opt.named:  # [k_p] state, never a dense tensor
        st, k = opt.state[p], mask[n].numel()
        assert all(st[key].numel() == k for key in ("index", "exp_avg", "exp_avg_sq")), n
    k = sum(v.numel() for v in mask.values())
    assert opt.state_bytes() == {"moments": 8 * k, "grad_accumulators": 4 * k, "masters": 0, "indices": 4 * k}

    before = {n: p.detach().clone() for n, p in named.items()}
    exs, pad = toy_examples(2)
    _backward(model, batches(exs, 2, pad)[0], 2)
    assert all(p.grad is None for p in model.parameters())  # the hooks keep only [k_p]
    opt.step()
    moved = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert moved and moved <= {n for n, _ in decay}  # the lr-0 group stays put
    with pytest.raises(ConfigError, match="named"):
        SparseAdamW(model.parameters(), mask)
