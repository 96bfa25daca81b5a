"""The pass engine (scoring/passes.py): sums and rows of a sharded pass in one process equal the plain
loops', rows come back in the examples' order whatever the batch order, and a row pass resumes bitwise."""

from __future__ import annotations

import pytest
import torch
from scoring_helpers import random_direction, toy_batches, toy_toks

from dualsft.scoring.passes import BatchOut, run_pass, sharded_pass
from dualsft.scoring.progress import PassCheckpoint
from dualsft.scoring.rows import row_scores, row_step
from dualsft.scoring.stats import gradient_step, gradient_sum, trainable_params, zeros_like_params
from dualsft.testing import micro_llama


def test_sharded_pass_matches_the_plain_loops_in_pool_order(tokenizer):
    model = micro_llama(tied=True, seed=0)
    params = trainable_params(model)
    toks = toy_toks(tokenizer, 9)
    u = random_direction(params)
    timings: dict = {}
    G = sharded_pass("G", toks, gradient_step(model, params), zeros_like_params(params, torch.float64), 4,
                     tokenizer.pad_token_id, timings).sums
    # the engine sorts by length; G is a sum, so it equals the unsorted loop up to float32 summation order
    G_ref = gradient_sum(model, toy_batches(tokenizer, 9, 4), params, acc_dtype=torch.float64)
    assert all(torch.allclose(G[n], G_ref[n], rtol=1e-5, atol=1e-6 * float(G_ref[n].abs().max())) for n in G)
    rows = sharded_pass("rows", toks, row_step(model, u, "jvp"), {}, 4, tokenizer.pad_token_id, timings,
                        row_names=("scores", "losses")).rows
    ref, _ = row_scores(model, toy_batches(tokenizer, 9, 1), u, method="jvp")  # one example a batch: pool order
    assert torch.allclose(rows["scores"], ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    assert list(timings) == ["G", "rows"] and timings["rows"]["examples"] == 9


class Killed(Exception):
    """Stands in for the process dying between two batches."""


def test_rows_and_sums_resume_bitwise(tmp_path):
    data = [{"input_ids": torch.zeros(2, 1), "x": torch.randn(2, 3, generator=torch.Generator().manual_seed(i))}
            for i in range(5)]

    def step(batch: dict) -> BatchOut:
        return BatchOut(2, sums={"s": batch["x"].sum(0)}, rows={"r": batch["x"] * 2})

    def dies_after(k: int):
        for i, b in enumerate(data):
            if i == k:
                raise Killed
            yield b

    clean = run_pass(data, step, {"s": torch.zeros(3)})
    ckpt = PassCheckpoint(tmp_path, "p", 2, len(data))
    with pytest.raises(Killed):
        run_pass(dies_after(3), step, {"s": torch.zeros(3)}, checkpoint=ckpt)
    resumed = run_pass(data, step, {"s": torch.zeros(3)}, checkpoint=ckpt)
    assert torch.equal(clean.sums["s"], resumed.sums["s"]) and torch.equal(clean.rows["r"], resumed.rows["r"])
