"""The scoring settings record (scoring/settings.py): written beside the scores, read back by one loader."""

from __future__ import annotations

import json
from dataclasses import replace

from dualsft.scoring.score import ScoreConfig
from dualsft.scoring.settings import ScoringSettings, load_settings, save_settings


def test_record_takes_the_score_config_defaults_and_round_trips(tmp_path):
    cfg = ScoreConfig()
    rec = ScoringSettings.from_config(cfg, "theta_w")
    assert (rec.eta, rec.order, rec.lambda_prior, rec.template) == (cfg.eta, cfg.order, cfg.lambda_prior, cfg.template)
    save_settings(tmp_path, rec)
    assert load_settings(tmp_path) == rec


def test_scores_without_settings_json_read_their_metadata(tmp_path):
    rec = ScoringSettings.from_config(replace(ScoreConfig(), eta=1e-3, order=1, model="m"), "theta_0")
    config = {k: v for k, v in rec.__dict__.items() if k != "scored_at"}
    (tmp_path / "metadata.json").write_text(json.dumps({"config": config, "scored_at": "theta_0"}))
    assert load_settings(tmp_path) == rec
    # a partial record: the rest from ScoreConfig's defaults, the model from the metadata's model id
    partial = {"config": {"eta": 1e-3, "order": 1}, "model": {"id": "m"}, "scored_at": "theta_0"}
    (tmp_path / "metadata.json").write_text(json.dumps(partial))
    assert load_settings(tmp_path) == rec
