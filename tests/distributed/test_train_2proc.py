"""`dualsft train` on 2 gloo processes equals 1 process (sparse: only [k] values all-reduced; full FT; LoRA)."""

from __future__ import annotations

import json
import shutil

import pytest
from dist_helpers import run_torchrun, tensors_rel_diff

from dualsft.cli import main as cli
from dualsft.io import read_json, read_jsonl, write_jsonl
from dualsft.selection.mask import save_mask
from dualsft.testing import byte_tokenizer, micro_llama, toy_records

# Measured (micro Llama, float32, CPU, micro-batch 1 so the summation order differs): max|Δ| / max|a| of the
# trained values 6.6e-7 (sparse), 1.3e-5 (full), 6.3e-6 (LoRA) after 6 AdamW steps at lr 1e-2. The gradients
# agree to float32 rounding (~1e-7); AdamW's m/√v then magnifies it on entries whose gradient is ~1e-8
# (update ≈ lr·g/(|g| + ε)). Exactly 0 when the shards fall on micro-batch boundaries (same additions).
TRAIN_RTOL = 1e-4


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    """A micro Llama folder, 9 training examples (steps of 4, 4, 1: the last leaves one rank empty), a mask."""
    d = tmp_path_factory.mktemp("dist_train")
    model = micro_llama(tied=True, seed=0)
    model.save_pretrained(d / "model")
    byte_tokenizer().save_pretrained(d / "model")
    write_jsonl(d / "train.jsonl", toy_records(9, 0))
    import torch

    g = torch.Generator().manual_seed(0)
    mask = {n: torch.randperm(p.numel(), generator=g)[: max(1, p.numel() // 20)].sort().values.to(torch.int32)
            for n, p in model.named_parameters()}
    save_mask(d / "mask.safetensors", mask, {n: tuple(p.shape) for n, p in model.named_parameters()})
    return d


def _args(d, out, method: str) -> list[str]:
    return ["train", "--model", str(d / "model"), "--train-file", str(d / "train.jsonl"), "--mask",
            str(d / "mask.safetensors") if method == "sparse" else "none", "--method", method, "--run-dir",
            str(d / "run"), "--out", str(out), "--batch-size", "4", "--micro-batch-size", "1", "--epochs", "2",
            "--lr", "1e-2", "--max-length", "64", "--no-progress", "--attn-implementation", "eager",
            "--checkpoint-every", "2", *(["--lora-dropout", "0", "--lora-r", "4"] if method == "lora" else [])]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sparse", "full", "lora"])
def test_train_two_processes_match_one(train_inputs, tmp_path, method):
    d = train_inputs
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(_args(d, one, method)) == 0
    run_torchrun(["-m", "dualsft", *_args(d, two, method), "--sharding", "none"])  # data parallel
    info = read_json(two / "adapter.json")
    assert info["complete"] and info["result"]["world_size"] == 2
    assert read_json(one / "adapter.json")["result"]["world_size"] == 1
    artifact = "adapter/adapter_model.safetensors" if method == "lora" else "delta.safetensors"
    rel = tensors_rel_diff(one / artifact, two / artifact)
    assert rel <= TRAIN_RTOL, rel
    m1, m2 = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [r["examples"] for r in m2] == [4, 4, 1, 4, 4, 1] and [r["tokens"] for r in m1] == [r["tokens"] for r in m2]
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]
    print(json.dumps({"method": method, "delta_max_rel_diff": rel}))


# --sharding fsdp: the trained values on FSDP2 shards (2 ranks, each with optimizer state for its own rows
# only) equal an unsharded single process; the gathered weights equal the base bit for bit outside the mask
FSDP_SCRIPT = """
import json, sys, torch
from dualsft import distributed as dist
from dualsft.data.formats import load_examples, tokenize_examples
from dualsft.models import load_model, load_tokenizer
from dualsft.selection.mask import load_mask
from dualsft.training.loop import TrainSettings, train_restricted

d, out = sys.argv[1], sys.argv[2]
dist.dist_context("cpu")
model = load_model(d + "/model", "float32", "cpu", attn_implementation="eager")
base = {n: p.detach().clone() for n, p in model.named_parameters()}
tok = load_tokenizer(d + "/model")
toks = tokenize_examples(load_examples(d + "/train.jsonl"), tok, "chat", 64)
mask, _ = load_mask(d + "/mask.safetensors")
settings = TrainSettings(method="sparse", lr=1e-2, epochs=2, batch_size=4, micro_batch_size=1,
                         checkpoint_every=0, progress=False, sharding="fsdp")
res = train_restricted(model, toks, mask, settings, tok.pad_token_id)
outside = changed = 0
for n, p in res.model.named_parameters():
    full = p.full_tensor().detach().reshape(-1)
    keep = torch.ones(full.numel(), dtype=torch.bool)
    keep[mask[n].long()] = False
    outside += int(keep.sum())
    changed += int((full[keep] != base[n].reshape(-1)[keep]).sum())
json.dump({"outside": outside, "changed_outside": changed, "moments": res.state_bytes["moments"],
           "k": sum(int(v.numel()) for v in mask.values())}, open(f"{out}.rank{dist.rank()}.json", "w"))
dist.shutdown()
"""


@pytest.mark.slow
def test_fsdp_sparse_training_matches_one_process(train_inputs, tmp_path):
    d = train_inputs
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli([*_args(d, one, "sparse"), "--keep-checkpoints"]) == 0
    run_torchrun(["-m", "dualsft", *_args(d, two, "sparse"), "--sharding", "fsdp", "--keep-checkpoints"])
    assert read_json(two / "adapter.json")["result"]["world_size"] == 2
    rel = tensors_rel_diff(one / "delta.safetensors", two / "delta.safetensors")
    print(json.dumps({"method": "sparse fsdp", "delta_max_rel_diff": rel}))
    assert rel <= 1e-5, rel
    # the checkpoint (gathered from both ranks' shards) holds what the unsharded run's holds
    assert tensors_rel_diff(one / "checkpoints" / "step-000006" / "state.safetensors",
                            two / "checkpoints" / "step-000006" / "state.safetensors") <= 1e-4
    # a sharded run resumes from an unsharded run's checkpoint (same tensors): here the finished step 6, so
    # its delta is the loaded values, sliced onto the shards and gathered back
    three = tmp_path / "three"
    shutil.copytree(one / "checkpoints", three / "checkpoints")
    run_torchrun(["-m", "dualsft", *_args(d, three, "sparse"), "--sharding", "fsdp"])
    assert tensors_rel_diff(one / "delta.safetensors", three / "delta.safetensors") == 0.0
    script = tmp_path / "fsdp_check.py"
    script.write_text(FSDP_SCRIPT)
    run_torchrun([str(script), str(d), str(tmp_path / "check")])
    ranks = [read_json(tmp_path / f"check.rank{r}.json") for r in (0, 1)]
    assert all(r["outside"] > 0 and r["changed_outside"] == 0 for r in ranks)
    # each rank keeps Adam moments for its own rows' selected entries only: together exactly k (2 × 4 bytes each)
    assert sum(r["moments"] for r in ranks) == 8 * ranks[0]["k"] and all(r["moments"] < 8 * r["k"] for r in ranks)


@pytest.mark.slow
def test_fsdp_full_training_matches_one_process(train_inputs, tmp_path):
    """--method full --sharding fsdp: AdamW over DTensor shards, the dense delta gathered onto rank 0."""
    d = train_inputs
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(_args(d, one, "full")) == 0
    run_torchrun(["-m", "dualsft", *_args(d, two, "full"), "--sharding", "fsdp"])
    rel = tensors_rel_diff(one / "delta.safetensors", two / "delta.safetensors")
    print(json.dumps({"method": "full fsdp", "delta_max_rel_diff": rel}))
    assert rel <= TRAIN_RTOL, rel
