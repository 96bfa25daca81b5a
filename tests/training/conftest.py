"""Training tests run micro models: one intra-op thread is 10-50x faster than two on a loaded machine
(the spin-waits of a second thread dominate tensors this small)."""

from __future__ import annotations

import pytest

from dualsft.testing import one_torch_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield
