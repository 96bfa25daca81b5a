"""Fixtures of the scoring tests; helpers live in scoring_helpers.py."""

from __future__ import annotations

import pytest
import torch

from dualsft.testing import byte_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(autouse=True)
def _one_thread():
    """Micro models gain nothing from threads, and on the shared 2-core machines two torch threads per
    process oversubscribe the CPU (measured ~10x slower); restore the setting after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
