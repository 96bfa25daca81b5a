"""Determinism on CPU (issue 8, part 3): the same commands with the same seed, in two separate run
folders, give BITWISE-identical warm-up state, scores, selections and trained deltas; another seed
changes what the seed decides (warm-up subset, anchor set, data order) and therefore the results.
What is and is not bitwise on GPU is documented in docs/errors.md ("Determinism").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reliability_helpers import model_args

from dualsft.cli import main as cli
from dualsft.io import load_tensors, read_json, read_jsonl
from dualsft.testing import one_torch_thread

SCORE_FILES = ("param_scores.safetensors", "u.safetensors", "v.safetensors", "grad_sum.safetensors")


def pipeline(model_dir: Path, data: Path, run: Path, seed: int) -> Path:
    """warmup -> score (order 2, anchors) -> select -> train (sparse, 2 steps) through the CLI."""
    common = model_args(model_dir, run, "--seed", str(seed))
    pool, target = str(data / "pool.jsonl"), str(data / "target.jsonl")
    assert cli(["warmup", *common, "--pool", pool, "--warmup-ratio", "0.5", "--batch-size", "4",
                "--micro-batch-size", "2", "--lr", "1e-3"]) == 0
    assert cli(["score", *common, "--pool", pool, "--target", target, "--eta", "1e-2", "--anchor-ratio", "0.2",
                "--batch-size", "4"]) == 0
    assert cli(["select", "--run-dir", str(run), "--data-budget", "0.5", "--param-budget", "0.05",
                "--no-plot"]) == 0
    assert cli(["train", *common, "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "2", "--lr", "1e-2",
                "--no-progress", "--attn-implementation", "eager"]) == 0
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, micro_model_dir: Path, data_dir: Path) -> dict[str, Path]:
    """Seed 0 twice (runs a, b) and seed 1 once (run c), each in its own folder."""
    with one_torch_thread():
        root = tmp_path_factory.mktemp("determinism")
        return {name: pipeline(micro_model_dir, data_dir, root / name, seed)
                for name, seed in (("a", 0), ("b", 0), ("c", 1))}


def same_tensors(a: Path, b: Path) -> bool:
    """Same names, dtypes, shapes and bits (torch.equal on the raw bytes: NaN-safe, -0.0 vs 0.0 differ)."""
    ta, tb = load_tensors(a), load_tensors(b)
    return ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
        and torch.equal(ta[k].contiguous().view(torch.uint8), tb[k].contiguous().view(torch.uint8)) for k in ta)


def test_same_seed_same_warmup(runs: dict[str, Path]) -> None:
    a, b = runs["a"] / "warmup", runs["b"] / "warmup"
    assert read_json(a / "warmup_indices.json") == read_json(b / "warmup_indices.json")
    assert same_tensors(a / "exp_avg_sq.safetensors", b / "exp_avg_sq.safetensors")
    assert same_tensors(a / "model" / "model.safetensors", b / "model" / "model.safetensors")


def test_same_seed_bitwise_identical_scores(runs: dict[str, Path]) -> None:
    a, b = runs["a"] / "scores", runs["b"] / "scores"
    for f in SCORE_FILES:
        assert same_tensors(a / f, b / f), f
    assert (a / "data_scores.jsonl").read_bytes() == (b / "data_scores.jsonl").read_bytes()
    sa, sb = read_json(a / "summary.json"), read_json(b / "summary.json")
    for key in ("uTG", "sum_param", "sum_data", "anchor_indices", "u_term_norms", "mean_pool_loss"):
        assert sa[key] == sb[key], key


def test_same_seed_identical_selection(runs: dict[str, Path]) -> None:
    a, b = runs["a"] / "selection", runs["b"] / "selection"
    assert same_tensors(a / "mask.safetensors", b / "mask.safetensors")
    assert (a / "subset.jsonl").read_bytes() == (b / "subset.jsonl").read_bytes()


def test_same_seed_bitwise_identical_delta(runs: dict[str, Path]) -> None:
    a, b = runs["a"] / "train", runs["b"] / "train"
    assert same_tensors(a / "delta.safetensors", b / "delta.safetensors")
    la, lb = ([r["loss"] for r in read_jsonl(d / "metrics.jsonl")] for d in (a, b))
    assert la == lb and len(la) == 2
    assert read_json(a / "adapter.json")["result"]["final_loss"] == read_json(b / "adapter.json")["result"]["final_loss"]


def test_other_seed_changes_what_the_seed_decides(runs: dict[str, Path]) -> None:
    a, c = runs["a"], runs["c"]
    assert read_json(a / "warmup" / "warmup_indices.json") != read_json(c / "warmup" / "warmup_indices.json")
    assert read_json(a / "scores" / "summary.json")["anchor_indices"] != \
        read_json(c / "scores" / "summary.json")["anchor_indices"]
    # θw differs, hence every score; a different data order changes the trained delta
    assert not same_tensors(a / "warmup" / "exp_avg_sq.safetensors", c / "warmup" / "exp_avg_sq.safetensors")
    assert not same_tensors(a / "scores" / "param_scores.safetensors", c / "scores" / "param_scores.safetensors")
    assert (a / "scores" / "data_scores.jsonl").read_bytes() != (c / "scores" / "data_scores.jsonl").read_bytes()
    assert not same_tensors(a / "train" / "delta.safetensors", c / "train" / "delta.safetensors")


def test_training_seed_alone_changes_the_data_order(runs: dict[str, Path], micro_model_dir: Path,
                                                    tmp_path: Path) -> None:
    """Same selection, only `train --seed` differs: the delta changes (seeded data order), and rerunning
    with the original seed into a fresh folder reproduces run a's delta bit for bit."""
    outs = {}
    for seed in (0, 5):
        outs[seed] = tmp_path / f"train-seed{seed}"
        assert cli(["train", *model_args(micro_model_dir, runs["a"], "--seed", str(seed)), "--out", str(outs[seed]),
                    "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "2", "--lr", "1e-2",
                    "--no-progress", "--attn-implementation", "eager"]) == 0
    assert same_tensors(outs[0] / "delta.safetensors", runs["a"] / "train" / "delta.safetensors")
    assert not same_tensors(outs[5] / "delta.safetensors", outs[0] / "delta.safetensors")
