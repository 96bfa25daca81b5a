"""Helpers of the scoring tests (a uniquely named module: several test folders have a conftest.py)."""

from __future__ import annotations

import torch

from dualsft.data.formats import TokenizedExample, batches, normalise_record, tokenize_examples
from dualsft.testing import micro_gpt2, micro_llama, toy_records

MODELS = {"llama": micro_llama, "gpt2": micro_gpt2}
def toy_toks(tokenizer, n: int, seed: int = 0) -> list[TokenizedExample]:
    """n tokenised toy examples of varied lengths (so batches carry right padding)."""
    ex = [normalise_record(r, "toy", i) for i, r in enumerate(toy_records(n, seed))]
    return tokenize_examples(ex, tokenizer, "chat", 96)


def toy_batches(tokenizer, n: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return batches(toy_toks(tokenizer, n, seed), batch_size, tokenizer.pad_token_id)


def random_direction(params: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A dense random u over EVERY trainable parameter (so every parameter type is exercised)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (scale-free; the scores have no natural unit)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())
