"""--sharding fsdp's pure parts: the rows a rank holds (as FSDP2 splits dim 0, i.e. torch.chunk) and the run
of the mask's sorted flat indices inside them; the settings it refuses. The 2-process equality with an
unsharded run is tests/distributed/test_train_2proc.py::test_fsdp_sparse_training_matches_one_process."""

from __future__ import annotations

import pytest
import torch
from tests.training.train_helpers import fresh, toy_examples

from dualsft.errors import ConfigError
from dualsft.training.loop import TrainSettings, train_restricted
from dualsft.training.sharded import local_rows, local_span


@pytest.mark.parametrize("rows", [1, 2, 7, 259, 576])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_local_rows_are_torch_chunk(rows: int, world: int) -> None:
    chunks = list(torch.arange(rows).chunk(world))
    for r in range(world):
        start, end = local_rows(rows, r, world)
        ref = chunks[r] if r < len(chunks) else torch.zeros(0, dtype=torch.int64)
        assert end - start == ref.numel() and (not ref.numel() or start == int(ref[0]))


@pytest.mark.parametrize("shape", [(259, 32), (7,), (5, 3, 2)])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_local_spans_split_the_mask_into_rank_runs(shape: tuple[int, ...], world: int) -> None:
    """Concatenating every rank's run, shifted back by its offset, gives the mask again, and each local index
    addresses the same entry of the rank's shard as the global index does of the full tensor."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(shape, generator=g)
    numel = full.numel()
    idx = torch.randperm(numel, generator=g)[: numel // 3 + 1].sort().values.to(torch.int32)
    shards = list(full.chunk(world, dim=0))
    pieces = []
    for r in range(world):
        a, b, offset = local_span(idx, shape, r, world)
        local = idx[a:b].long() - offset
        shard = shards[r] if r < len(shards) else full[:0]
        assert bool((local >= 0).all()) and bool((local < shard.numel()).all())
        assert torch.equal(shard.reshape(-1)[local], full.reshape(-1)[idx[a:b].long()])
        pieces.append(idx[a:b])
    assert torch.equal(torch.cat(pieces), idx)


def test_fsdp_refuses_other_methods_and_loss_chunk() -> None:
    toks, pad = toy_examples(4)
    model = fresh("llama-tied")
    for kw, match in (({"method": "lora"}, "--method lora"), ({"method": "sparse", "loss_chunk": 8}, "loss-chunk"),
                      ({"method": "sparse", "sharding": "zero"}, "must be one of")):
        settings = TrainSettings(**{"sharding": "fsdp", **kw}, progress=False, checkpoint_every=0)
        with pytest.raises(ConfigError, match=match):
            train_restricted(model, toks, None, settings, pad)
