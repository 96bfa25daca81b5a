"""Micro pools, target sets and fake warm-up curvature for the baseline tests."""

from __future__ import annotations

import pytest
import torch

from dualsft.data.formats import batches, normalise_record, tokenize_examples
from dualsft.scoring.stats import trainable_params
from dualsft.testing import one_torch_thread, toy_records


def _make_batches(tokenizer, n: int, seed: int, batch_size: int = 4, offset: int = 0) -> list[dict]:
    recs = toy_records(n, seed=seed)
    ex = [normalise_record(r, f"toy:{i}", i + offset) for i, r in enumerate(recs)]
    toks = tokenize_examples(ex, tokenizer, "chat", max_length=64)
    return batches(toks, batch_size, tokenizer.pad_token_id)


def _fake_curvature(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Positive 'exp_avg_sq' per trainable parameter, spread over orders of magnitude like a real one."""
    g = torch.Generator().manual_seed(seed)
    return {n: (10 ** (-8 + 3 * torch.rand(p.shape, generator=g))).to(p.dtype)
            for n, p in trainable_params(model).items()}


@pytest.fixture(scope="session")
def make_batches(tokenizer):
    """make_batches(n, seed, batch_size=4, offset=0) -> collated batches of toy records (stable indices)."""
    return lambda n, seed, batch_size=4, offset=0: _make_batches(tokenizer, n, seed, batch_size, offset)


@pytest.fixture(scope="session")
def fake_curvature():
    return _fake_curvature


@pytest.fixture(scope="module")
def pool(tokenizer):
    return _make_batches(tokenizer, 20, seed=1)


@pytest.fixture(scope="module")
def target(tokenizer):
    return _make_batches(tokenizer, 6, seed=2, offset=1000)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread for every test here (see ``dualsft.testing.one_torch_thread`` for why)."""
    with one_torch_thread():
        yield
