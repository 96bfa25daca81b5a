"""Shared fixtures: micro models, the byte tokenizer, and a saved micro model folder for CLI tests."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dualsft.testing import byte_tokenizer, micro_llama


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory) -> Path:
    """A micro Llama + byte tokenizer saved as a HF folder, usable as --model in CLI tests."""
    d = tmp_path_factory.mktemp("micro_llama")
    micro_llama(tied=True, seed=0).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(autouse=True)
def _quiet_and_seeded():
    torch.manual_seed(0)
    logging.getLogger("dualsft").setLevel(logging.INFO)
    yield
