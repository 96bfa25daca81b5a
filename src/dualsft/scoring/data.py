"""Data plumbing shared by `dualsft warmup` and `dualsft score`: tokenised splits and seeded slices."""

from __future__ import annotations

import math
from typing import Any

import torch

from dualsft.config import CommonConfig
from dualsft.data.formats import TokenizedExample, load_examples, tokenize_examples
from dualsft.errors import ConfigError


def load_split(path: str, tokenizer: Any, cfg: CommonConfig, source: str) -> list[TokenizedExample]:
    """Read and tokenise one data file with the run's template / max_length / drop_empty settings; the loss
    covers the tokens ``cfg.score_tokens`` names (`dualsft score`'s variant; "response" for other stages)."""
    if not path:
        raise ConfigError(f"--{source} is required: a data file (JSONL/JSON), a saved dataset FOLDER[@split] or "
                          "hf://owner/name[:config][@split] of instruction/response pairs")
    # the option and file go into every message (truncation counts, examples without response tokens)
    return tokenize_examples(load_examples(path), tokenizer, cfg.template, cfg.max_length, cfg.drop_empty,
                             f"--{source} {path}", loss_tokens=getattr(cfg, "score_tokens", "response"),
                             assistant_turns=cfg.assistant_turns)


def sample_positions(n: int, ratio: float, seed: int) -> list[int]:
    """A seeded random ``ratio`` of range(n), sorted; at least one position when ratio > 0 and n > 0.

    The same (n, ratio, seed) always gives the same positions (torch.Generator, CPU), so the warm-up
    subset and the anchor set are reproducible and recorded.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"ratio must be in [0, 1], got {ratio}")
    if ratio == 0.0 or n == 0:
        return []
    k = min(n, max(1, math.ceil(ratio * n - 1e-9)))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())
