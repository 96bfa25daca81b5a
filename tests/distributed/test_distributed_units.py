"""Pure helpers of dualsft.distributed: sharding covers every item once, gathering restores pool order."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from dist_helpers import run_torchrun

from dualsft.distributed import DistContext, all_reduce_dict_, dist_context, gather_rows, shard
from dualsft.errors import ConfigError


@pytest.mark.parametrize("strategy", ["contiguous", "strided"])
def test_shard_covers_every_item_exactly_once(strategy):
    for n in range(0, 23):
        for world in range(1, 6):
            parts = [shard(n, r, world, strategy) for r in range(world)]
            flat = sorted(i for p in parts for i in p)
            assert flat == list(range(n)), (n, world)
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1  # balanced for any n, divisible or not
            assert parts == [shard(n, r, world, strategy) for r in range(world)]  # deterministic


def test_contiguous_shards_are_ranges_in_rank_order():
    assert [shard(10, r, 3) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [shard(2, r, 3) for r in range(3)] == [[0], [1], []]  # more ranks than items: some get none
    assert shard(10, 1, 3, "strided") == [1, 4, 7]


def test_shard_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="rank"):
        shard(5, 2, 2)
    with pytest.raises(ConfigError, match="strategy"):
        shard(5, 0, 2, "random")


def test_gather_rows_restores_pool_order_in_one_process():
    n = 7
    perm = torch.randperm(n)
    values = torch.arange(n, dtype=torch.float64)[perm] * 10  # value of position i is 10 i
    out = gather_rows(values, perm, n)
    assert torch.equal(out, torch.arange(n, dtype=torch.float64) * 10)
    two_col = gather_rows(torch.stack([values, -values], 1), perm.tolist(), n)
    assert two_col.shape == (n, 2) and torch.equal(two_col[:, 1], -out)


def test_gather_rows_refuses_missing_or_duplicate_positions():
    with pytest.raises(ConfigError, match="covered"):
        gather_rows(torch.zeros(3), [0, 1, 1], 3)
    with pytest.raises(ConfigError, match="indices"):
        gather_rows(torch.zeros(3), [0, 1], 3)


def test_single_process_context_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = dist_context()
    assert ctx == DistContext() and ctx.is_main and not ctx.enabled
    t = {"a": torch.ones(3)}
    assert all_reduce_dict_(t)["a"].tolist() == [1.0, 1.0, 1.0]


SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from dualsft import distributed as dist

    ctx = dist.dist_context("cpu")
    n = 9                                         # not divisible by 2: shards of 5 and 4
    mine = dist.shard(n, ctx.rank, ctx.world_size, "strided")
    scores = torch.tensor([100.0 + i for i in mine][::-1], dtype=torch.float64)   # any local order
    full = dist.gather_rows(scores, mine[::-1], n)
    t = {"f32": torch.full((3,), float(ctx.rank + 1)), "bf16": torch.full((2, 2), 0.5 + ctx.rank,
         dtype=torch.bfloat16), "f64": torch.tensor([1e-12 * (ctx.rank + 1)], dtype=torch.float64)}
    dist.all_reduce_dict_(t)
    out = {"rank": ctx.rank, "world": ctx.world_size, "gathered": full.tolist(),
           "f32": t["f32"].tolist(), "bf16": t["bf16"].float().flatten().tolist(), "f64": t["f64"].tolist(),
           "sum": dist.all_reduce_sum([1.0, float(ctx.rank)])}
    with open(sys.argv[1] + f".{ctx.rank}.json", "w") as f:
        json.dump(out, f)
    dist.shutdown()
''')


@pytest.mark.slow
def test_collectives_on_two_gloo_processes(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(SCRIPT)
    run_torchrun([str(script), str(tmp_path / "out")])
    for r in (0, 1):
        out = json.loads((tmp_path / f"out.{r}.json").read_text())
        assert out["world"] == 2 and out["rank"] == r
        assert out["gathered"] == [100.0 + i for i in range(9)]  # pool order, on every rank
        assert out["f32"] == [3.0] * 3 and out["bf16"] == [2.0] * 4 and out["f64"] == pytest.approx([3e-12])
        assert out["sum"] == [2.0, 1.0]


def test_sharding_auto_resolves_per_world_size_and_method(monkeypatch):
    """--sharding auto (the default): FSDP2 under torchrun with more than one process, data parallel for what
    FSDP2 does not support here (LoRA, dense-masked, --loss-chunk), nothing to shard in one process; an
    explicit fsdp that cannot run is refused."""
    from dualsft.errors import ConfigError
    from dualsft.training.sharded import resolve_sharding, training_blocker

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_sharding("auto", None) == "none"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_sharding("auto", training_blocker("sparse", 0)) == "fsdp"
    assert resolve_sharding("auto", training_blocker("full", 0)) == "fsdp"
    assert resolve_sharding("auto", training_blocker("lora", 0)) == "none"
    assert resolve_sharding("auto", training_blocker("full", 256)) == "none"
    assert resolve_sharding("none", None) == "none"
    with pytest.raises(ConfigError, match="--method dense-masked"):
        resolve_sharding("fsdp", training_blocker("dense-masked", 0))
    with pytest.raises(ConfigError, match="--sharding must be one of"):
        resolve_sharding("zero3", None)
