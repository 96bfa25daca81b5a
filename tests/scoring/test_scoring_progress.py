"""Progress checkpoints of the scoring passes (scoring/progress.py), in process: a pass interrupted after a
few batches and resumed from its progress file gives bitwise the uninterrupted result. The SIGKILL of a
real `dualsft score` process is tests/reliability/test_resume.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from scoring_helpers import random_direction, toy_batches

from dualsft.scoring.progress import PassCheckpoint
from dualsft.scoring.rows import score_pool
from dualsft.scoring.stats import gradient_sum, trainable_params
from dualsft.testing import micro_llama


class Killed(Exception):
    """Stands in for the process dying between two batches."""


def _dies_after(batches: list[dict], k: int) -> Iterator[dict]:
    for i, b in enumerate(batches):
        if i == k:
            raise Killed
        yield b


def test_gradient_sum_resumes_bitwise(tokenizer, tmp_path):
    model = micro_llama(tied=True, seed=0)
    params = trainable_params(model)
    bs = toy_batches(tokenizer, 14, 2)  # 7 batches
    clean = gradient_sum(model, bs, params)
    ckpt = PassCheckpoint(tmp_path, "pool_G", 2, len(bs))
    with pytest.raises(Killed):
        gradient_sum(model, _dies_after(bs, 5), params, checkpoint=ckpt)
    assert ckpt.load()[0] == 4  # saved after batches 2 and 4; batch 5 is redone
    resumed = gradient_sum(model, bs, params, checkpoint=ckpt)
    assert all(torch.equal(clean[n], resumed[n]) for n in clean)
    assert ckpt.load()[0] == 7  # the finished pass is saved whole: a rerun computes nothing
    again = gradient_sum(model, [], params, checkpoint=PassCheckpoint(tmp_path, "pool_G", 2, len(bs)))
    assert all(torch.equal(clean[n], again[n]) for n in clean)


@pytest.mark.parametrize("grad_sum", [False, True])
def test_score_pool_resumes_bitwise(tokenizer, tmp_path, grad_sum):
    model = micro_llama(tied=True, seed=0)
    u = random_direction(trainable_params(model))
    bs = toy_batches(tokenizer, 10, 2)  # 5 batches
    s0, l0, g0 = score_pool(model, bs, u, "ghost", grad_sum=grad_sum)
    ckpt = PassCheckpoint(tmp_path, "pool", 1, len(bs))
    with pytest.raises(Killed):
        score_pool(model, _dies_after(bs, 3), u, "ghost", grad_sum=grad_sum, checkpoint=ckpt)
    s1, l1, g1 = score_pool(model, bs, u, "ghost", grad_sum=grad_sum, checkpoint=ckpt)
    assert torch.equal(s0, s1) and torch.equal(l0, l1)
    if grad_sum:
        assert g0 is not None and g1 is not None and all(torch.equal(g0[n], g1[n]) for n in g0)


def test_progress_off_or_for_another_pass_is_not_resumed(tmp_path):
    PassCheckpoint(tmp_path, "pool_G", 1, 3).save(2, {"x": torch.ones(2)})
    assert PassCheckpoint(tmp_path, "pool_G", 1, 3).load()[0] == 2
    assert PassCheckpoint(tmp_path, "pool_G", 0, 3).load() == (0, {})  # --checkpoint-every 0: off
    assert PassCheckpoint(tmp_path, "pool_G", 1, 4).load() == (0, {})  # other batches: start over


def _other_rank(monkeypatch, latest: float) -> None:
    """Stand in for a second rank under --sharding fsdp whose latest save is after ``latest`` batches and that
    holds the agreed one: ``load``'s two all-reduces are the MIN of the ranks' latest saves (as the max of
    their negatives) and the max of the "I lack it" flags."""
    from dualsft.scoring import progress

    monkeypatch.setattr(progress.dist, "all_reduce_max",
                        lambda v: [max(v[0], -latest)] if v[0] < 0 else [max(v[0], 0.0)])


def test_sharded_ranks_resume_from_the_latest_save_they_all_hold(tmp_path, monkeypatch):
    """--sharding fsdp: the ranks' progress files are rows of ONE sum, so they must resume from the same batch.
    A kill between two ranks' saves leaves this rank at batch 4 and the other at 2: each rank keeps its previous
    save, so both resume from batch 2 (this rank's previous file), not from 4."""
    ckpt = PassCheckpoint(tmp_path, "pool", 2, 6, aligned=True)
    ckpt.save(2, {"sum.G": torch.full((3,), 2.0)})
    ckpt.save(4, {"sum.G": torch.full((3,), 4.0)})
    _other_rank(monkeypatch, latest=2.0)
    done, saved = PassCheckpoint(tmp_path, "pool", 2, 6, aligned=True).load()
    assert done == 2 and torch.equal(saved["sum.G"], torch.full((3,), 2.0))
    _other_rank(monkeypatch, latest=4.0)
    done, saved = PassCheckpoint(tmp_path, "pool", 2, 6, aligned=True).load()
    assert done == 4 and torch.equal(saved["sum.G"], torch.full((3,), 4.0))


def test_sharded_ranks_without_a_common_save_start_over(tmp_path, monkeypatch):
    """If some rank does not hold the agreed batch count (e.g. its files were lost), every rank starts the pass
    over instead of mixing states."""
    from dualsft.scoring import progress

    PassCheckpoint(tmp_path, "pool", 1, 5, aligned=True).save(3, {"sum.G": torch.ones(3)})
    answers = iter([[-3.0], [1.0]])  # min over ranks is 3; some rank lacks a save after batch 3
    monkeypatch.setattr(progress.dist, "all_reduce_max", lambda v: next(answers))
    assert PassCheckpoint(tmp_path, "pool", 1, 5, aligned=True).load() == (0, {})


def test_progress_of_another_layout_is_ignored(tmp_path):
    """A data-parallel (replicated) progress file never resumes a sharded pass, nor the reverse: their tensors
    hold different things (whole sums vs one rank's rows)."""
    PassCheckpoint(tmp_path, "pool", 1, 5).save(2, {"sum.G": torch.ones(3)})
    assert PassCheckpoint(tmp_path, "pool", 1, 5, aligned=True).load() == (0, {})
    assert PassCheckpoint(tmp_path, "pool", 1, 5).load()[0] == 2
