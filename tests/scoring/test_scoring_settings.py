"""The scoring settings record (scoring/settings.py): written beside the scores, read back by one loader."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dualsft.config import PAPER_SCORE
from dualsft.errors import ConfigError
from dualsft.scoring.score import ScoreConfig
from dualsft.scoring.settings import ScoringSettings, load_settings, resolve_precondition, save_settings


def test_record_takes_the_score_config_defaults_and_round_trips(tmp_path):
    cfg = ScoreConfig()
    rec = ScoringSettings.from_config(cfg, "theta_w")
    assert (rec.eta, rec.order, rec.lambda_prior, rec.template) == (cfg.eta, cfg.order, cfg.lambda_prior, cfg.template)
    save_settings(tmp_path, rec)
    assert load_settings(tmp_path) == rec


def test_scores_without_settings_json_read_their_metadata(tmp_path):
    # such scores predate the scoring-formula options: they were made with the paper's formula
    rec = ScoringSettings.from_config(replace(ScoreConfig(), eta=1e-3, order=1, model="m", **PAPER_SCORE), "theta_0")
    config = {k: v for k, v in rec.__dict__.items() if k != "scored_at"}
    (tmp_path / "metadata.json").write_text(json.dumps({"config": config, "scored_at": "theta_0"}))
    assert load_settings(tmp_path) == rec
    # a partial record: the scoring formula the paper's (not today's defaults), the rest from ScoreConfig's
    # defaults, the model from the metadata's model id
    partial = {"config": {"eta": 1e-3, "order": 1}, "model": {"id": "m"}, "scored_at": "theta_0"}
    (tmp_path / "metadata.json").write_text(json.dumps(partial))
    assert load_settings(tmp_path) == rec


def test_settings_json_without_the_formula_fields_reads_the_papers(tmp_path):
    """A settings.json written before data_score / target_gradient / precondition / data_params were recorded
    holds scores made with the paper's formula: it must not read as today's defaults (LESS's form)."""
    rec = ScoringSettings.from_config(replace(ScoreConfig(), model="m", **PAPER_SCORE), "theta_w")
    old = {k: v for k, v in rec.__dict__.items() if k not in (*PAPER_SCORE, "score_tokens")}
    (tmp_path / "settings.json").write_text(json.dumps(old))
    assert load_settings(tmp_path) == rec


def test_precondition_auto_resolves_from_whether_c_exists():
    assert ScoreConfig().precondition == "auto"
    assert resolve_precondition("auto", "RUN/warmup/exp_avg_sq.safetensors") == "adam-step"
    assert resolve_precondition("auto", None) == "none"  # at θ0 there is no c
    for explicit in ("none", "adam", "adam-step"):  # kept; adam(-step) without c is refused where c is loaded
        assert resolve_precondition(explicit, None) == explicit
    with pytest.raises(ConfigError, match="--precondition 'sgd'"):
        ScoreConfig(precondition="sgd")


def test_the_defaults_are_lessform_and_jvp_asks_for_inner():
    """The default formula is LESS's form; --method jvp with the default cosine ranking is refused with the
    fix in the message (not silently re-ranked), and scores with --data-score inner."""
    cfg = ScoreConfig()
    assert (cfg.data_params, cfg.data_score, cfg.target_gradient) == ("linear", "cosine", "normalized")
    with pytest.raises(ConfigError, match="pass --data-score inner to score with jvp"):
        ScoreConfig(method="jvp")
    assert ScoreConfig(method="jvp", data_score="inner").target_gradient == "normalized"
