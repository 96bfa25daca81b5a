"""--gradient-checkpointing: the layers really recompute, and the trained weights (and the warm-up's c) are the
same as without it."""

from __future__ import annotations

import pytest
import torch
from tests.training.train_helpers import fresh, random_mask, toy_examples

from dualsft.errors import ConfigError
from dualsft.models import gradient_checkpointing
from dualsft.training.loop import TrainSettings, train_restricted


def layer_forward_calls(model: torch.nn.Module, run) -> int:
    """How many times the first decoder layer's MLP computed during ``run()``. Counted by wrapping its
    ``forward``: transformers checkpoints a layer's ``forward``, and module hooks do not run in the recompute."""
    mlp = next(m for name, m in model.named_modules() if name.endswith(("layers.0.mlp", "h.0.mlp")))
    calls = []
    inner = mlp.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    mlp.forward = counted
    try:
        run()
    finally:
        del mlp.forward
    return len(calls)


@pytest.mark.parametrize("method", ["sparse", "full", "lora"])
def test_checkpointing_recomputes_and_trains_the_same_weights(method: str) -> None:
    toks, pad = toy_examples(8)
    trained = {}
    calls = {}
    for gc in (False, True):
        model = fresh("llama-tied")
        mask = random_mask(model, 0.1) if method == "sparse" else None
        settings = TrainSettings(method=method, lr=1e-2, epochs=1, batch_size=4, micro_batch_size=2, seed=0,
                                 checkpoint_every=0, progress=False, gradient_checkpointing=gc)
        holder: dict = {}

        def run(model=model, mask=mask, settings=settings, holder=holder) -> None:
            holder["r"] = train_restricted(model, toks, mask, settings, pad)

        calls[gc] = layer_forward_calls(model, run)
        result = holder["r"]
        trained[gc] = {n: p.detach().clone() for n, p in result.model.named_parameters()}
        inner = result.model.get_base_model() if method == "lora" else result.model
        assert not inner.is_activation_checkpointing  # left as it came
        assert not hasattr(inner, "_require_grads_hook") or method == "lora"
    # 2 steps × 2 micro-batches = 4 forwards; checkpointing adds one recompute per backward
    assert calls[False] == 4 and calls[True] == 8
    for n, w in trained[False].items():
        assert torch.allclose(trained[True][n], w, rtol=0, atol=1e-6), n


def test_warmup_curvature_same_with_checkpointing() -> None:
    from dualsft.scoring.warmup import WarmupConfig, warm_up

    toks, pad = toy_examples(8)
    out = {}
    for gc in (False, True):
        model = fresh("gpt2-untied")
        cfg = WarmupConfig(batch_size=4, micro_batch_size=2, lr=1e-3, gradient_checkpointing=gc)
        out[gc] = warm_up(model, toks, pad, cfg, progress=False)
    for n, c in out[False].exp_avg_sq.items():
        assert torch.allclose(out[True].exp_avg_sq[n], c, rtol=1e-6, atol=1e-12), n
    for (n, a), (_, b) in zip(out[False].model.named_parameters(), out[True].model.named_parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), n


def test_unsupported_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        with gradient_checkpointing(torch.nn.Linear(2, 2), True):
            pass
    with gradient_checkpointing(torch.nn.Linear(2, 2), False):  # off: nothing is asked of the model
        pass
