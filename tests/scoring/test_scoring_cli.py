"""`dualsft warmup` and `dualsft score` end to end on a micro Llama saved as an HF folder (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

from dualsft.cli import main as cli
from dualsft.errors import ConfigError
from dualsft.io import load_tensors, read_json, read_jsonl
from dualsft.scoring.data import sample_positions
from dualsft.scoring.settings import load_settings
from dualsft.testing import byte_tokenizer, micro_llama, toy_records


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory):
    """A micro Llama + byte tokenizer saved with save_pretrained, plus pool and target files."""
    d = tmp_path_factory.mktemp("micro")
    model = micro_llama(tied=True, seed=0)
    model.save_pretrained(str(d / "model"))
    byte_tokenizer().save_pretrained(str(d / "model"))
    for name, n, seed in (("pool", 20, 0), ("target", 6, 1)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_records(n, seed)))
    return d


def _common(d, run):
    return ["--model", str(d / "model"), "--pool", str(d / "pool.jsonl"), "--run-dir", str(run), "--max-length", "64"]


def test_sample_positions_seeded():
    a = sample_positions(100, 0.1, 3)
    assert a == sample_positions(100, 0.1, 3) and len(a) == 10 and a == sorted(a)
    assert a != sample_positions(100, 0.1, 4)
    assert sample_positions(100, 0.0, 3) == [] and len(sample_positions(5, 0.01, 0)) == 1


def test_warmup_then_score_end_to_end(micro_folder, tmp_path):
    d, run = micro_folder, tmp_path / "run"
    assert cli(["warmup", *_common(d, run), "--warmup-ratio", "0.5", "--micro-batch-size", "2", "--batch-size", "4",
                "--lr", "1e-3"]) == 0
    w = run / "warmup"
    assert (w / "model" / "model.safetensors").exists() and (w / "model" / "tokenizer.json").exists()
    used = read_json(w / "warmup_indices.json")["indices"]
    assert len(used) == 10 and used == sorted(set(used))
    c = load_tensors(w / "exp_avg_sq.safetensors")
    assert all(t.dtype == torch.float32 for t in c.values())

    args = ["score", *_common(d, run), "--target", str(d / "target.jsonl"), "--dtype", "float64",
            "--stats-dtype", "float64", "--eta", "1e-2", "--anchor-ratio", "0.2"]
    assert cli(args) == 0
    s = run / "scores"
    summary = read_json(s / "summary.json")
    rows = read_jsonl(s / "data_scores.jsonl")
    phi = load_tensors(s / "param_scores.safetensors")
    u, v, G = (load_tensors(s / f) for f in ("u.safetensors", "v.safetensors", "grad_sum.safetensors"))
    model = micro_llama(tied=True)
    names = {n: p.shape for n, p in model.named_parameters()}
    assert set(phi) == set(names) == set(u) == set(v) == set(G)
    assert all(phi[n].shape == names[n] and phi[n].dtype == torch.float32 for n in names)
    assert [r["index"] for r in rows] == list(range(20))  # pool order
    assert all(r["tokens"] > 0 for r in rows)
    assert summary["order"] == 2 and summary["passes"] == ["target", "anchor", "pool_G", "pool_rows"]
    utg = summary["uTG"]
    assert abs(summary["sum_param"] - utg) <= 1e-5 * abs(utg)  # φ_param saved in float32
    assert abs(summary["sum_data"] - utg) <= 1e-6 * abs(utg)
    assert summary["u_term_norms"]["half_eta2_c_G"] > 0 and summary["u_term_norms"]["eta_lambda_prior_v_prior"] > 0
    assert summary["scored_at"] == "theta_w"
    settings = load_settings(s)  # the one typed record later stages read η, order, ... from
    assert (settings.eta, settings.order, settings.stats_dtype, settings.scored_at) == (1e-2, 2, "float64", "theta_w")
    assert settings.model == str(d / "model") and settings.max_length == 64

    # first order with the ghost one-pass: the same G, and rows = ⟨ηv, g_n⟩
    assert cli([*args, "--order", "1", "--overwrite"]) == 0
    s1 = read_json(s / "summary.json")
    assert s1["passes"] == ["target", "anchor", "pool"]
    G1 = load_tensors(s / "grad_sum.safetensors")
    assert all(torch.allclose(G1[n], G[n], rtol=1e-5, atol=1e-7) for n in G)
    rows1 = read_jsonl(s / "data_scores.jsonl")
    assert abs(sum(r["score"] for r in rows1) - s1["uTG"]) <= 1e-6 * abs(s1["uTG"])


def test_score_at_theta0_refuses_order2_without_curvature(micro_folder, tmp_path):
    d, run = micro_folder, tmp_path / "run0"
    assert cli(["warmup", *_common(d, run), "--warmup-ratio", "0"]) == 0
    assert not (run / "warmup" / "model").exists()
    from dualsft.scoring.score import CONFIG, main

    with pytest.raises(ConfigError, match="curvature"):
        main(CONFIG(model=str(d / "model"), pool=str(d / "pool.jsonl"), target=str(d / "target.jsonl"),
                    run_dir=str(run), max_length=64))
    args = ["score", *_common(d, run), "--target", str(d / "target.jsonl"), "--order", "1", "--method", "jvp"]
    assert cli(args) == 0
    summary = read_json(run / "scores" / "summary.json")
    assert summary["scored_at"] == "theta_0" and summary["passes"] == ["target", "pool"]
    assert any("anchor" in s for s in summary["skipped"])
