"""The warm-up is the full fine-tuning case of the training loop: θw, c = Adam's raw exp_avg_sq and the
step losses equal, bit for bit, a hand-written warm-up loop (torch's AdamW, one generator kept across epochs)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import fresh, toy_examples

from dualsft.data.formats import TokenizedExample, batches
from dualsft.losses import per_example_loss
from dualsft.scoring.warmup import WarmupConfig, warm_up
from dualsft.training.loop import chained_epoch_order


def reference_warmup(model: torch.nn.Module, toks: list[TokenizedExample], pad: int, cfg: WarmupConfig
                     ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The ORACLE: full-parameter torch.optim.AdamW at a constant lr, no clipping; each epoch takes the next
    permutation of ONE generator seeded with ``cfg.seed``; a step's loss is the mean of its examples' l_n.
    Returns (c = raw exp_avg_sq as float32 by parameter name, step losses); trains ``model`` in place."""
    params = dict(model.named_parameters())  # tied weights once
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(toks), generator=g).tolist()
        for start in range(0, len(order), cfg.batch_size):
            step = order[start:start + cfg.batch_size]
            total = 0.0
            for mb in batches([toks[i] for i in step], cfg.micro_batch_size, pad):
                l_n = per_example_loss(model, mb)  # [b]
                (l_n.sum() / len(step)).backward()
                total += float(l_n.detach().sum())
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total / len(step))
    model.eval()
    return {n: opt.state[p]["exp_avg_sq"].float() for n, p in params.items()}, losses


@pytest.mark.parametrize("arch", ["llama-tied", "gpt2-untied"])
@pytest.mark.parametrize("epochs,wd", [(2, 0.0), (1, 0.1)])
def test_warmup_equals_the_hand_written_loop_bitwise(arch: str, epochs: int, wd: float) -> None:
    """11 examples in steps of 4 (micro-batches 2+2, the last step 3 = 2+1), 2 epochs: order, update and c
    are all pinned; nothing but bit equality is accepted."""
    toks, pad = toy_examples(11)
    cfg = WarmupConfig(lr=1e-3, weight_decay=wd, epochs=epochs, batch_size=4, micro_batch_size=2, seed=3)
    model, ref_model = fresh(arch), fresh(arch)
    result = warm_up(model, toks, pad, cfg, progress=False)
    ref_c, ref_losses = reference_warmup(ref_model, toks, pad, cfg)
    assert [m["loss"] for m in result.metrics] == ref_losses and len(ref_losses) == 3 * epochs
    assert result.exp_avg_sq.keys() == ref_c.keys() == dict(model.named_parameters()).keys()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), dict(ref_model.named_parameters())[n].detach()), n
        c = result.exp_avg_sq[n]
        assert c.dtype == torch.float32 and c.device.type == "cpu" and torch.equal(c, ref_c[n]), n
        assert float(c.abs().sum()) > 0, n  # float32 keeps the tiny second moments
    assert not model.training


def test_float64_model_gives_float32_curvature() -> None:
    toks, pad = toy_examples(4)
    cfg = WarmupConfig(lr=1e-3, batch_size=4, micro_batch_size=4)
    result = warm_up(fresh("llama-tied", torch.float64), toks, pad, cfg, progress=False)
    assert {c.dtype for c in result.exp_avg_sq.values()} == {torch.float32}


def test_chained_epoch_order_is_one_generator_across_epochs() -> None:
    g = torch.Generator().manual_seed(7)
    draws = [torch.randperm(10, generator=g).tolist() for _ in range(3)]
    assert [chained_epoch_order(10, 7, e) for e in range(3)] == draws
    assert draws[0] != draws[1]
