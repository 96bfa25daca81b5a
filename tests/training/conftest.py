"""Training tests run micro models: one intra-op thread is 10-50x faster than two on a loaded machine
(the spin-waits of a second thread dominate tensors this small)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
