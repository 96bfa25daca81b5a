"""`dualsft select` end to end on a scored micro run: outputs, re-selection without a model, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dualsft.cli import main as cli
from dualsft.data.formats import load_examples
from dualsft.errors import ArtifactError, MetadataMismatchError
from dualsft.io import read_json, read_jsonl, write_json, write_jsonl
from dualsft.selection.mask import load_mask
from dualsft.selection.select import SelectConfig
from dualsft.selection.select import main as select_main
from dualsft.testing import byte_tokenizer, micro_llama


@pytest.fixture
def run(scored_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(scored_run.run, dst)
    return dst


def test_select_writes_every_artifact(run, scored_run):
    assert cli(["select", "--run-dir", str(run), "--data-budget", "0.25", "--param-budget", "0.1"]) == 0
    out = run / "selection"
    rows = read_jsonl(out / "subset.jsonl")
    assert len(rows) == 6 and [r["index"] for r in rows] == sorted(r["index"] for r in rows)
    top6 = torch.sort(scored_run.phi_data, descending=True, stable=True).indices[:6].sort().values.tolist()
    assert [r["index"] for r in rows] == top6
    pool = read_jsonl(scored_run.pool)
    assert all({k: r[k] for k in pool[0]} == pool[r["index"]] for r in rows)  # original fields kept
    assert [e.index for e in load_examples(out / "subset.jsonl")] == top6      # usable as a training file
    idx, shapes = load_mask(out / "mask.safetensors")
    d = sum(t.numel() for t in scored_run.phi_param.values())
    assert sum(v.numel() for v in idx.values()) == round(0.1 * d) and set(shapes) == set(scored_run.phi_param)
    s = read_json(out / "summary.json")
    assert s["param"]["k"] == round(0.1 * d) and s["data"]["b"] == 6
    assert {"per_layer", "per_group", "per_param", "stages", "global_threshold"} <= set(s["param"])
    assert set(s["data"]["overlap"]) == {"task", "source"}
    assert sum(v["selected"] for v in s["data"]["overlap"]["task"].values()) == 6
    assert (out / "mask_density.png").stat().st_size > 1000
    assert read_json(out / "metadata.json")["model"]["fingerprint"] is not None


def test_reselect_reuses_scores_without_any_model(run, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("select must not load a model or run a pass here")

    monkeypatch.setattr("dualsft.models.load_model", boom)
    monkeypatch.setattr("dualsft.scoring.stats.gradient_sum", boom)
    monkeypatch.setattr("dualsft.scoring.rows.row_scores", boom)
    assert cli(["select", "--run-dir", str(run)]) == 0
    # other budgets into the same folder: refused, naming the field and the way out
    with pytest.raises(MetadataMismatchError, match="--out"):
        select_main(SelectConfig(run_dir=str(run), data_budget=0.5))
    assert cli(["select", "--run-dir", str(run), "--data-budget", "0.5", "--param-budget", "0.02",
                "--out", "selection-b0.5-k0.02", "--granularity", "row"]) == 0
    assert len(read_jsonl(run / "selection-b0.5-k0.02" / "subset.jsonl")) == 12
    assert len(read_jsonl(run / "selection" / "subset.jsonl")) == 2


def test_changed_pool_is_refused(run):
    meta = read_json(run / "scores" / "metadata.json")
    pool = run / "pool_copy.jsonl"
    pool.write_text((run / "pool.jsonl").read_text().replace("What", "Whot"))
    meta["data"]["pool"]["path"] = str(pool)
    write_json(run / "scores" / "metadata.json", meta)
    with pytest.raises(MetadataMismatchError, match="changed since scoring"):
        select_main(SelectConfig(run_dir=str(run)))


def test_scores_from_another_model_are_refused(run, tmp_path):
    other = tmp_path / "other"
    micro_llama(seed=1).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    with pytest.raises(MetadataMismatchError, match="fingerprint"):
        select_main(SelectConfig(run_dir=str(run), model=str(other)))


def test_scores_with_other_shapes_are_refused(run, tmp_path):
    other = tmp_path / "other"
    micro_llama(seed=0, vocab_size=300).save_pretrained(other)
    meta = read_json(run / "scores" / "metadata.json")
    meta["model"]["fingerprint"] = None  # only the shapes can tell
    write_json(run / "scores" / "metadata.json", meta)
    with pytest.raises(ArtifactError, match="shape"):
        select_main(SelectConfig(run_dir=str(run), model=str(other)))


def test_missing_scores_say_which_command_to_run(tmp_path):
    with pytest.raises(ArtifactError, match="dualsft score"):
        select_main(SelectConfig(run_dir=str(tmp_path)))


def test_cli_reports_budget_errors_with_exit_code_2(run):
    assert cli(["select", "--run-dir", str(run), "--param-budget", "0", "--out", "bad"]) == 2
    assert cli(["select", "--run-dir", str(run), "--quota-layer", "0.8", "--quota-module", "0.4", "--out", "bad2"]) == 2
    assert cli(["select", "--run-dir", str(run), "--data-budget", "25", "--out", "bad3"]) == 2
    assert cli(["select", "--run-dir", str(run), "--include", "nothing_like_this", "--out", "bad4"]) == 2
    assert not any((run / d).exists() for d in ("bad", "bad2", "bad3", "bad4"))  # nothing half-written


def test_surrogate_of_the_independent_pair(run, scored_run):
    assert cli(["select", "--run-dir", str(run), "--surrogate", "--out", "with-I"]) == 0
    s = read_json(run / "with-I" / "summary.json")["surrogate"]
    assert [h["step"] for h in s["I_history"]] == ["start"] and s["passes"]["row_score_examples"] == 0


def test_joint_rounds_through_the_cli(run):
    assert cli(["select", "--run-dir", str(run), "--data-budget", "8", "--param-budget", "0.05", "--joint-rounds", "2",
                "--quota-layer", "0", "--quota-module", "0", "--out", "joint"]) == 0
    s = json.loads((run / "joint" / "summary.json").read_text())["surrogate"]
    hist = s["I_history"]
    assert hist[0]["step"] == "start" and s["parameter_step_monotone_guaranteed"]
    for prev, cur in zip(hist, hist[1:]):
        if cur["step"] == "param":
            assert cur["I"] >= prev["I"] - 1e-12 * abs(prev["I"])
    assert s["I_final"] == max(h["I"] for h in hist)
    assert s["passes"]["row_score_examples"] == 24 * sum(h["step"] == "data" for h in hist)


def test_mask_sign_abs_ranks_the_mask_only(run, scored_run):
    """--mask-sign abs ranks parameter entries by |φ_param|; examples stay the top-b of signed φ_data."""
    rows = read_jsonl(run / "scores" / "data_scores.jsonl")
    phi = torch.tensor([r["score"] for r in rows], dtype=torch.float64) - 0.5 * scored_run.phi_data.abs().max()
    write_jsonl(run / "scores" / "data_scores.jsonl", [{**r, "score": float(p)} for r, p in zip(rows, phi)])
    signed = torch.sort(phi, descending=True, stable=True).indices[:6].sort().values.tolist()
    by_abs = torch.sort(phi.abs(), descending=True, stable=True).indices[:6].sort().values.tolist()
    assert signed != by_abs  # shifted scores: the most negative are the largest in magnitude
    assert cli(["select", "--run-dir", str(run), "--data-budget", "6", "--mask-sign", "abs", "--out", "abs"]) == 0
    assert [r["index"] for r in read_jsonl(run / "abs" / "subset.jsonl")] == signed
    s = read_json(run / "abs" / "summary.json")
    assert s["param"]["sign"] == "abs" and s["data"]["sign"] == "signed"


def test_sign_is_a_deprecated_alias_of_mask_sign(run, caplog):
    assert cli(["select", "--run-dir", str(run), "--sign", "abs", "--out", "old"]) == 0
    assert "--sign is deprecated" in caplog.text
    assert cli(["select", "--run-dir", str(run), "--mask-sign", "abs", "--out", "new"]) == 0
    assert load_mask(run / "old" / "mask.safetensors")[0].keys() == load_mask(run / "new" / "mask.safetensors")[0].keys()
    assert read_json(run / "old" / "metadata.json")["config"] == {**read_json(run / "new" / "metadata.json")["config"],
                                                                 "out": "old"}
