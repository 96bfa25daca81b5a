"""Matched-budget selectors: random / loss / all / LESS-style / DualSFT data selection, random / magnitude /
SIFT / full / LoRA / DualSFT parameter selection, and the sequential hybrids less→sift and sift→less.
See docs/baselines.md."""

from dualsft.baselines.budget import resolve_budget, top_b, topk_entries
from dualsft.baselines.cost import Cost
from dualsft.baselines.less import LessConfig, less_scores
from dualsft.baselines.registry import (
    DATA_SELECTORS,
    HYBRIDS,
    PARAM_SELECTORS,
    BaselineContext,
    BaselineSelection,
    DataResult,
    DualSFTScores,
    ParamResult,
    make_context,
    select_baseline,
    select_hybrid,
    subset_batches,
)
from dualsft.baselines.sketch import SignFoldSketch
from dualsft.baselines.writer import write_selection

__all__ = [
    "DATA_SELECTORS", "HYBRIDS", "PARAM_SELECTORS", "BaselineContext", "BaselineSelection", "Cost", "DataResult",
    "DualSFTScores", "LessConfig", "ParamResult", "SignFoldSketch", "less_scores", "make_context", "resolve_budget",
    "select_baseline", "select_hybrid", "subset_batches", "top_b", "topk_entries", "write_selection",
]
