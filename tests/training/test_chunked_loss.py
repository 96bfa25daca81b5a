"""--loss-chunk: the chunked LM head + cross-entropy (losses.chunked_per_example_loss) against the full-logits
loss (losses.per_example_loss, the reference): same per-example losses and gradients, on every micro
architecture, tied or not, with padding on either side, and through peft; the head really sees at most
``chunk`` positions per call; training with it gives the same weights."""

from __future__ import annotations

import pytest
import torch
from tests.training.train_helpers import MODELS, fresh, random_mask, toy_examples

from dualsft.data.formats import batches
from dualsft.errors import ConfigError
from dualsft.losses import causal_lm_parts, chunked_per_example_loss, per_example_loss
from dualsft.training.loop import TrainSettings, train_restricted


def batch_of(n: int, side: str = "right") -> dict[str, torch.Tensor]:
    toks, pad = toy_examples(n)
    b = next(iter(batches(toks, n, pad)))
    if side == "left":  # move each row's padding to the front (the real tokens stay contiguous)
        for k in ("input_ids", "attention_mask", "labels"):
            fill = {"input_ids": pad, "attention_mask": 0, "labels": -100}[k]
            rows = []
            for r in range(n):
                keep = b["attention_mask"][r].bool()
                real = b[k][r][keep]
                rows.append(torch.cat([torch.full((int((~keep).sum()),), fill, dtype=real.dtype), real]))
            b[k] = torch.stack(rows)
    return b


def losses_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    losses = fn(model, batch)
    losses.sum().backward()
    return losses.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def head_rows(model, run) -> list[int]:
    """Rows of hidden states the LM head received per call during ``run()``."""
    _, head = causal_lm_parts(model)
    seen: list[int] = []
    handle = head.register_forward_hook(lambda m, i, o: seen.append(int(i[0].reshape(-1, i[0].shape[-1]).shape[0])))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_chunked_loss_equals_full_logits(arch: str, side: str) -> None:
    # float64 on right padding; left padding in float32 (transformers' eager Llama mask gives NaN on a left-
    # padded float64 batch, in the reference loss too), with float32 tolerances
    dtype, rtol, atol = (torch.float64, 1e-12, 1e-14) if side == "right" else (torch.float32, 1e-5, 1e-7)
    model = fresh(arch, dtype)
    batch = batch_of(5, side)
    ref_l, ref_g = losses_and_grads(model, per_example_loss, batch)
    response = int(batch["labels"][:, 1:].ne(-100).sum())
    for chunk in (1, 7, 10_000):
        rows = head_rows(model, lambda c=chunk: losses_and_grads(model, lambda m, b: chunked_per_example_loss(m, b, c),
                                                                 batch))
        l, g = losses_and_grads(model, lambda m, b, c=chunk: chunked_per_example_loss(m, b, c), batch)
        assert torch.allclose(l, ref_l, rtol=rtol, atol=0), (arch, chunk)
        assert set(g) == set(ref_g)
        for n, t in ref_g.items():
            assert torch.allclose(g[n], t, rtol=100 * rtol, atol=atol), (arch, chunk, n)
        # the head sees the response positions only, at most `chunk` per call, each chunk twice (recomputed)
        assert max(rows) <= chunk and sum(rows) == 2 * response, (rows, response)


def test_chunked_loss_through_peft_lora() -> None:
    from dualsft.training.lora import wrap_lora

    model = wrap_lora(fresh("llama-untied", torch.float64), 4, 8, 0.0)
    batch = batch_of(4)
    ref_l, ref_g = losses_and_grads(model, per_example_loss, batch)
    l, g = losses_and_grads(model, lambda m, b: chunked_per_example_loss(m, b, 5), batch)
    assert torch.allclose(l, ref_l, rtol=1e-12, atol=0)
    assert ref_g and set(g) == set(ref_g) and all("lora" in n for n in g)
    for n, t in ref_g.items():
        assert torch.allclose(g[n], t, rtol=1e-10, atol=1e-14), n


@pytest.mark.parametrize("method", ["sparse", "dense-masked", "full"])
def test_training_with_loss_chunk_gives_the_same_weights(method: str) -> None:
    toks, pad = toy_examples(8)
    trained = {}
    for chunk in (0, 6):
        model = fresh("llama-tied")
        mask = random_mask(model, 0.1) if method != "full" else None
        settings = TrainSettings(method=method, lr=1e-2, epochs=1, batch_size=4, micro_batch_size=2, seed=0,
                                 checkpoint_every=0, progress=False, loss_chunk=chunk)
        rows = head_rows(model, lambda m=model, k=mask, s=settings, c=chunk: trained.__setitem__(
            c, train_restricted(m, toks, k, s, pad)))
        assert (max(rows) <= 6) == bool(chunk)
    a, b = (dict(trained[c].model.named_parameters()) for c in (0, 6))
    assert [x["loss"] for x in trained[0].metrics] == pytest.approx([x["loss"] for x in trained[6].metrics], rel=1e-6)
    for n, w in a.items():  # lr 1e-2: Adam turns float32 rounding into ≤ 1e-6 on a rare entry (measured 1.01e-6)
        assert torch.allclose(b[n], w, rtol=0, atol=5e-6), n


def test_logit_transforms_and_bad_chunks_are_refused() -> None:
    model = fresh("llama-tied", torch.float64)
    batch = batch_of(2)
    model.config.final_logit_softcapping = 30.0  # a Gemma-2-style cap after the head: another loss
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        chunked_per_example_loss(model, batch, 8)
    model.config.final_logit_softcapping = None
    with pytest.raises(ConfigError, match="loss-chunk"):
        chunked_per_example_loss(model, batch, 0)
    with pytest.raises(ConfigError, match="no separate decoder"):
        causal_lm_parts(torch.nn.Linear(2, 2))
    toks, pad = toy_examples(4)
    with pytest.raises(ConfigError, match="loss-chunk"):
        train_restricted(model, toks, None, TrainSettings(method="full", loss_chunk=-1, progress=False), pad)
