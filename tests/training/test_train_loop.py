"""The training loop: resume == uninterrupted (bitwise), non-finite losses, schedules, LoRA, data order."""

from __future__ import annotations

import pytest
import torch
from train_helpers import fresh, random_mask, toy_examples

from dualsft.errors import MetadataMismatchError, NonFiniteLossError
from dualsft.losses import per_example_loss
from dualsft.training.loop import TrainSettings, lr_at, step_examples, total_steps, train_restricted


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["sparse", "full", "lora"])
def test_resume_equals_uninterrupted_bitwise(method: str, tmp_path) -> None:
    """4 steps straight vs 2 steps, 'crash', fresh θ0 + resume to 4: identical weights and metrics."""
    exs, pad = toy_examples(16)
    st = TrainSettings(method=method, lr=5e-3, batch_size=4, micro_batch_size=2, max_steps=4, checkpoint_every=1,
                       lr_schedule="cosine", warmup_steps=1, weight_decay=0.01, progress=False)
    model = fresh("gpt2-tied")
    mask = random_mask(model, 0.1)
    full = train_restricted(model, exs, mask, st, pad)
    part = train_restricted(fresh("gpt2-tied"), exs, mask, st, pad, checkpoint_dir=tmp_path, stop_after_steps=2)
    assert part.steps == 2 and not part.completed
    resumed = train_restricted(fresh("gpt2-tied"), exs, mask, st, pad, checkpoint_dir=tmp_path)
    assert resumed.completed and resumed.steps == 4
    a, b = _params(full.model), _params(resumed.model)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    strip = [{k: v for k, v in m.items() if k != "time"} for m in full.metrics]
    assert strip == [{k: v for k, v in m.items() if k != "time"} for m in resumed.metrics]


def test_checkpoint_with_other_settings_is_refused(tmp_path) -> None:
    exs, pad = toy_examples(8)
    st = TrainSettings(lr=1e-3, batch_size=4, micro_batch_size=4, max_steps=2, checkpoint_every=1, progress=False)
    model = fresh("llama-tied")
    mask = random_mask(model, 0.1)
    train_restricted(model, exs, mask, st, pad, checkpoint_dir=tmp_path, stop_after_steps=1)
    other = TrainSettings(lr=2e-3, batch_size=4, micro_batch_size=4, max_steps=2, checkpoint_every=1, progress=False)
    with pytest.raises(MetadataMismatchError, match="lr"):
        train_restricted(fresh("llama-tied"), exs, mask, other, pad, checkpoint_dir=tmp_path)


def test_nan_loss_stops_with_example_indices() -> None:
    exs, pad = toy_examples(8)

    def poisoned(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        losses = per_example_loss(model, batch)
        return torch.where(batch["index"] == 5, torch.full_like(losses, float("nan")), losses)

    model = fresh("llama-tied")
    st = TrainSettings(lr=1e-3, batch_size=4, micro_batch_size=2, epochs=1, progress=False)
    with pytest.raises(NonFiniteLossError) as e:
        train_restricted(model, exs, random_mask(model, 0.1), st, pad, loss_fn=poisoned)
    assert e.value.indices == [5]


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss whose gradient blows up)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g * float("nan")


@pytest.mark.parametrize("method", ["sparse", "dense-masked"])
def test_nan_gradient_stops_before_touching_weights(method: str) -> None:
    exs, pad = toy_examples(4)
    model = fresh("llama-tied")
    base = _params(model)
    st = TrainSettings(method=method, lr=1e-3, batch_size=4, micro_batch_size=4, epochs=1, progress=False)
    with pytest.raises(NonFiniteLossError, match="gradient norm") as e:
        train_restricted(model, exs, random_mask(model, 0.1), st, pad,
                         loss_fn=lambda m, b: _NanGrad.apply(per_example_loss(m, b)))
    assert sorted(e.value.indices) == [0, 1, 2, 3]
    assert all(torch.equal(p.detach(), base[n]) for n, p in model.named_parameters())


def test_lora_trains_only_adapters() -> None:
    exs, pad = toy_examples(8)
    model = fresh("llama-untied")
    base = _params(model)
    st = TrainSettings(method="lora", batch_size=4, micro_batch_size=4, epochs=2, lora_dropout=0.0, progress=False)
    res = train_restricted(model, exs, None, st, pad)
    assert all("lora_" in n for n in res.trainable) and len(res.trainable) == 2 * 7 * 2  # A,B x 7 linears x 2 layers
    assert res.metrics[-1]["lr"] == 2e-4 and res.metrics[-1]["loss"] < res.metrics[0]["loss"]
    merged = res.model.merge_and_unload()
    assert any(not torch.equal(p.detach(), base[n]) for n, p in merged.named_parameters())


def test_schedules_and_data_order() -> None:
    st = TrainSettings(lr=1.0, warmup_steps=2, lr_schedule="linear", batch_size=4, epochs=2)
    assert [lr_at(s, 10, st) for s in (0, 1, 2)] == [0.5, 1.0, 1.0] and lr_at(9, 10, st) == pytest.approx(1 / 8)
    cos = TrainSettings(lr=1.0, lr_schedule="cosine")
    lrs = [lr_at(s, 11, cos) for s in range(12)]
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs == sorted(lrs, reverse=True)
    assert total_steps(10, st) == 6  # ceil(10/4) * 2 epochs
    epoch0 = sorted(sum((step_examples(10, s, st) for s in range(3)), []))
    assert epoch0 == list(range(10)) and step_examples(10, 2, st) != step_examples(10, 5, st)
