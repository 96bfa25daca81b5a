"""Fixtures of the scoring tests; helpers live in scoring_helpers.py."""

from __future__ import annotations

import pytest

from dualsft.testing import byte_tokenizer, one_torch_thread


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread for every test here (see ``dualsft.testing.one_torch_thread`` for why)."""
    with one_torch_thread():
        yield
