"""Evaluation maths: summaries, run aggregation, KL(base ‖ tuned)."""

from __future__ import annotations

import math

import pytest
import torch

from dualsft.evaluation.metrics import aggregate_runs, kl_per_token, per_example_kl, summarise
from dualsft.losses import IGNORE_INDEX


def test_summarise():
    assert summarise([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert summarise([5]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert summarise([]) == {"mean": None, "std": None, "n": 0}


def test_aggregate_runs_over_seeds():
    runs = [{"target": {"task": "t", "accuracy": summarise([1, 0]), "loss": summarise([1.0, 1.0])}},
            {"target": {"task": "t", "accuracy": summarise([1, 1]), "loss": summarise([3.0, 3.0])}}]
    agg = aggregate_runs(runs)
    assert agg["target"]["task"] == "t"
    assert agg["target"]["loss"]["mean"] == 2.0 and agg["target"]["loss"]["n"] == 2
    assert agg["target"]["loss"]["std"] == pytest.approx(math.sqrt(2.0))
    assert agg["target"]["accuracy"]["n_per_run"] == [2, 2]


def test_kl_matches_definition_and_is_zero_on_itself():
    torch.manual_seed(0)
    p, q = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 5, 7, dtype=torch.float64)
    ref = (p.softmax(-1) * (p.log_softmax(-1) - q.log_softmax(-1))).sum(-1)
    assert torch.allclose(kl_per_token(p, q), ref)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 2:] = 1  # example 0: positions 1..3 predict response tokens
    labels[1, 4] = 1  # example 1: position 3 only
    kl = per_example_kl(p, q, labels)
    assert torch.allclose(kl, torch.stack([ref[0, 1:4].mean(), ref[1, 3]]))
    assert per_example_kl(p, p, labels).abs().max() == 0.0
