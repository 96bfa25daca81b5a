"""Fixtures of the multi-process tests (helpers live in dist_helpers.py: test modules import it by name)."""

from __future__ import annotations

import pytest

from dualsft.testing import one_torch_thread


@pytest.fixture(autouse=True)
def _one_thread():
    """In-process reference runs use one thread, like each torchrun worker (OMP_NUM_THREADS=1): on a shared
    2-core machine more threads only oversubscribe, and both sides then run the same kernels."""
    with one_torch_thread():
        yield
