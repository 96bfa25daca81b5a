"""`dualsft estimate`: exact parameter counts from configs on the meta device, and the per-rank arithmetic."""

from __future__ import annotations

import json

import pytest

from dualsft.cli import main as cli
from dualsft.errors import ConfigError
from dualsft.estimate import GIB, EstimateConfig, load_config, model_dims, stage_memory


@pytest.mark.parametrize("preset, params", [("smollm2-135m", 134_515_008), ("llama-3.2-3b", 3_212_749_824),
                                            ("llama-3.1-8b", 8_030_261_248)])
def test_presets_give_the_published_parameter_counts(preset, params):
    assert model_dims(load_config(preset), preset).params == params  # tied embeddings counted once


def test_statistics_placement_and_ranks():
    m = model_dims(load_config("llama-3.2-3b"), "llama-3.2-3b")
    rep = stage_memory(m, EstimateConfig(world_size=8, stats="replicated"))
    shard = stage_memory(m, EstimateConfig(world_size=8, stats="sharded"))
    off = stage_memory(m, EstimateConfig(world_size=8, stats="offload"))
    key = "score (ghost/jvp rows, anchor pass)"
    assert rep[key]["statistics_v_c_G_u"] == 16 * m.params  # float32 v, c, G, u: 4 × 4 bytes × d
    assert shard[key]["statistics_v_c_G_u"] == 16 * m.params // 8 and off[key]["statistics_v_c_G_u"] == 0
    assert rep[key]["weights"] == 2 * m.params  # bf16 weights, replicated
    sparse = rep["train sparse (SparseAdamW, k entries)"]["sparse_state"]
    assert sparse == 20 * int(0.1 * m.params)  # exp_avg, exp_avg_sq, accumulator, index, master


def test_estimate_cli_json_and_errors(capsys, tmp_path):
    assert cli(["estimate", "--model", "smollm2-135m", "--world-size", "2", "--stats", "sharded", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["params"] == 134_515_008 and all(v > 0 for v in out["gib_per_rank"].values())
    assert out["bytes_per_rank"]["score (ghost/jvp rows, anchor pass)"]["weights"] / GIB == pytest.approx(0.25, rel=0.01)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "vocab_size": 259, "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "tie_word_embeddings": True}))
    assert cli(["estimate", "--model", str(cfg)]) == 0
    assert "P = d = 0.00B" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="preset"):
        load_config(str(tmp_path / "missing"))


def test_gradient_checkpointing_keeps_layer_inputs_only():
    m = model_dims(load_config("llama-3.2-3b"), "llama-3.2-3b")
    plain = stage_memory(m, EstimateConfig(batch_size=4, seq_len=1024))
    ckpt = stage_memory(m, EstimateConfig(batch_size=4, seq_len=1024, gradient_checkpointing=True))
    B, T, wb = 4, 1024, 2
    layer = T * (6 * m.hidden + 2 * m.kv_dim + 4 * m.intermediate) * wb
    expect = B * (m.layers * T * m.hidden * wb + layer + T * m.vocab * 10)
    score = "score (ghost/jvp rows, anchor pass)"
    for stage in ("warmup (full AdamW, DDP as implemented)", "train sparse (SparseAdamW, k entries)", score):
        assert ckpt[stage]["activations"] == expect
        assert ckpt[stage]["activations"] < plain[stage]["activations"] / 2
    assert {k: v for k, v in ckpt[score].items() if k != "activations"} == \
        {k: v for k, v in plain[score].items() if k != "activations"}
    # --attention eager stands for --method jvp, which refuses --gradient-checkpointing: scoring not checkpointed
    eager = dict(batch_size=4, seq_len=1024, attention="eager")
    assert stage_memory(m, EstimateConfig(**eager, gradient_checkpointing=True))[score] == \
        stage_memory(m, EstimateConfig(**eager))[score]


def test_loss_chunk_keeps_one_chunk_of_logits():
    """--loss-chunk C: warm-up/training hold C positions' logits instead of B·T (scoring unchanged)."""
    m = model_dims(load_config("llama-3.2-3b"), "llama-3.2-3b")
    plain = stage_memory(m, EstimateConfig(batch_size=4, seq_len=1024))
    chunked = stage_memory(m, EstimateConfig(batch_size=4, seq_len=1024, loss_chunk=512))
    huge = stage_memory(m, EstimateConfig(batch_size=4, seq_len=1024, loss_chunk=10**6))
    for stage in ("warmup (full AdamW, DDP as implemented)", "train sparse (SparseAdamW, k entries)"):
        assert plain[stage]["activations"] - chunked[stage]["activations"] == (4 * 1024 - 512) * m.vocab * 10
        assert huge[stage]["activations"] == plain[stage]["activations"]  # a chunk larger than B·T is B·T
    score = "score (ghost/jvp rows, anchor pass)"
    assert chunked[score] == plain[score]
