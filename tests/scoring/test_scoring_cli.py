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
from dualsft.testing import byte_tokenizer, micro_llama, paper_score_flags, toy_records


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
    assert cli(args) == 0  # the defaults: LESS's form, Adam-step u (the warm-up left c)
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
    assert summary["order"] == 2 and summary["passes"] == ["target_norms", "target", "anchor", "pool_G", "pool_rows"]
    # auto resolved from the warm-up's c, recorded as used and as asked, in summary.json and settings.json
    assert (summary["precondition"], summary["precondition_requested"]) == ("adam-step", "auto")
    assert (summary["data_params"], summary["data_score"], summary["target_gradient"]) == ("linear", "cosine",
                                                                                          "normalized")
    utg = summary["uTG"]
    assert abs(summary["sum_param"] - utg) <= 1e-5 * abs(utg)  # φ_param saved in float32
    # linear rows: Σ_n ⟨u_R, g_n⟩ = Σ_{j∈R} φ_param_j (not uᵀG); "score" is the cosine, "inner" the product
    rows_total = summary["sum_param_rows"]
    assert abs(summary["sum_data"] - rows_total) <= 1e-6 * abs(rows_total)
    assert abs(sum(r["inner"] for r in rows) - rows_total) <= 1e-6 * abs(rows_total)
    assert abs(rows_total - utg) > 1e-6 * abs(utg)
    assert all(r["score"] == pytest.approx(r["inner"] / r["grad_norm"], rel=1e-9) for r in rows)
    assert summary["u_term_norms"]["half_eta2_c_G"] > 0 and summary["u_term_norms"]["eta_lambda_prior_v_prior"] > 0
    assert summary["scored_at"] == "theta_w"
    settings = load_settings(s)  # the one typed record later stages read η, order, ... from
    assert (settings.eta, settings.order, settings.stats_dtype, settings.scored_at) == (1e-2, 2, "float64", "theta_w")
    assert settings.model == str(d / "model") and settings.max_length == 64
    assert settings.precondition == "adam-step" and read_json(s / "metadata.json")["config"]["precondition"] == "auto"

    # first order with the ghost one-pass: the same G, and the inner rows = ⟨u_R, g_n⟩
    assert cli([*args, "--order", "1", "--overwrite"]) == 0
    s1 = read_json(s / "summary.json")
    assert s1["passes"] == ["target_norms", "target", "anchor", "pool"] and s1["precondition"] == "adam-step"
    G1 = load_tensors(s / "grad_sum.safetensors")
    assert all(torch.allclose(G1[n], G[n], rtol=1e-5, atol=1e-7) for n in G)
    rows1 = read_jsonl(s / "data_scores.jsonl")
    assert abs(sum(r["inner"] for r in rows1) - s1["sum_param_rows"]) <= 1e-6 * abs(s1["sum_param_rows"])

    # the paper's formula (--preset release's score options): the plain identity Σφ_data = uᵀG, SGD u
    assert cli([*args, *paper_score_flags(), "--order", "2", "--overwrite"]) == 0  # order 1 is recorded now
    sp = read_json(s / "summary.json")
    assert sp["passes"] == ["target", "anchor", "pool_G", "pool_rows"] and sp["precondition"] == "none"
    assert sp["precondition_requested"] == "none" and load_settings(s).data_score == "inner"
    assert abs(sp["sum_data"] - sp["uTG"]) <= 1e-6 * abs(sp["uTG"])
    assert abs(sum(r["score"] for r in read_jsonl(s / "data_scores.jsonl")) - sp["uTG"]) <= 1e-6 * abs(sp["uTG"])


def test_score_at_theta0_refuses_order2_without_curvature(micro_folder, tmp_path):
    d, run = micro_folder, tmp_path / "run0"
    assert cli(["warmup", *_common(d, run), "--warmup-ratio", "0"]) == 0
    assert not (run / "warmup" / "model").exists()
    from dualsft.scoring.score import CONFIG, main

    with pytest.raises(ConfigError, match="curvature"):
        main(CONFIG(model=str(d / "model"), pool=str(d / "pool.jsonl"), target=str(d / "target.jsonl"),
                    run_dir=str(run), max_length=64))
    # explicit Adam preconditioners still need c: refused, not resolved away
    for explicit in ("adam", "adam-step"):
        with pytest.raises(ConfigError, match=f"--precondition {explicit} needs Adam's exp_avg_sq"):
            main(CONFIG(model=str(d / "model"), pool=str(d / "pool.jsonl"), target=str(d / "target.jsonl"),
                        run_dir=str(run), max_length=64, order=1, precondition=explicit))
    # jvp has no per-example norms: the default cosine ranking is refused with the fix, which then works
    args = ["score", *_common(d, run), "--target", str(d / "target.jsonl"), "--order", "1", "--method", "jvp"]
    with pytest.raises(ConfigError, match="pass --data-score inner to score with jvp"):
        CONFIG(method="jvp")
    assert cli(args) != 0 and not (run / "scores" / "summary.json").exists()
    assert cli([*args, "--data-score", "inner"]) == 0
    summary = read_json(run / "scores" / "summary.json")
    # the normalized target (default) takes ‖g_q‖ from the ghost hooks under jvp too: target_norms ran
    assert summary["scored_at"] == "theta_0" and summary["passes"] == ["target_norms", "target", "pool"]
    assert any("anchor" in s for s in summary["skipped"])
    # auto at θ0: no c, so u for one SGD step; recorded as used and as asked
    assert (summary["precondition"], summary["precondition_requested"]) == ("none", "auto")
    assert load_settings(run / "scores").precondition == "none" and summary["curvature"] is None
    assert abs(summary["sum_data"] - summary["sum_param_rows"]) <= 1e-5 * abs(summary["sum_param_rows"])


def test_score_at_theta0_with_curvature_resolves_auto_to_adam_step(micro_folder, tmp_path):
    """--curvature FILE at θ0 gives c, so auto is adam-step there too (c exists, whatever its source)."""
    from dualsft.io import save_tensors

    d, run = micro_folder, tmp_path / "runc"
    c = {n: torch.full(p.shape, 1e-6) for n, p in micro_llama(tied=True).named_parameters()}
    save_tensors(tmp_path / "c.safetensors", c)
    assert cli(["score", *_common(d, run), "--target", str(d / "target.jsonl"), "--order", "1",
                "--curvature", str(tmp_path / "c.safetensors")]) == 0
    summary = read_json(run / "scores" / "summary.json")
    assert summary["scored_at"] == "theta_0" and summary["precondition"] == "adam-step"
    assert load_settings(run / "scores").precondition == "adam-step"
