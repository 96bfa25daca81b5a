"""CLI and configs: flags derive from the dataclasses; YAML < flags; unknown options are refused."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from dualsft.cli import COMMANDS, build_parser
from dualsft.config import CommonConfig, add_config_args, build_config, opt
from dualsft.errors import ConfigError
from dualsft.evaluation.compare import CompareConfig
from dualsft.scoring.score import ScoreConfig
from dualsft.selection.select import SelectConfig
from dualsft.stages import RunConfig
from dualsft.training.train import TrainConfig


@dataclass(frozen=True)
class Demo(CommonConfig):
    ratio: float = opt(0.1, "a fraction")
    mode: str = opt("a", "a mode")


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_args(p, Demo)
    return p.parse_args(argv)


def test_defaults_yaml_and_flags_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("ratio: 0.5\nmax-length: 64\n")
    cfg = build_config(Demo, parse(["--config", str(y), "--ratio", "0.25", "--overwrite"]))
    assert (cfg.ratio, cfg.max_length, cfg.overwrite, cfg.mode) == (0.25, 64, True, "a")
    assert build_config(Demo, parse([])) == Demo()


def test_unknown_yaml_option_is_refused(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("ratoi: 0.5\n")
    with pytest.raises(ConfigError, match="ratoi"):
        build_config(Demo, parse(["--config", str(y)]))


def test_bad_literal_choice_is_an_argparse_error():
    with pytest.raises(SystemExit):
        parse(["--template", "fancy"])


def test_every_available_command_documents_every_option():
    parser, mods = build_parser()
    assert "info" in mods
    for words, mod in mods.items():
        for f in dataclasses.fields(mod.CONFIG):
            assert f.metadata.get("help"), f"{words}: option {f.name} has no help text"


def test_console_entry_point_lists_commands():
    out = subprocess.run([sys.executable, "-m", "dualsft", "--help"], capture_output=True, text=True, check=True).stdout
    assert "info" in out and "COMMAND" in out
    assert set(COMMANDS) >= {"run", "data build", "warmup", "score", "select", "train", "eval", "compare"}


def run_config(argv):
    parser, _ = build_parser()
    args = vars(parser.parse_args(["run", *argv]))
    return build_config(RunConfig, {k: v for k, v in args.items() if k not in ("_module", "command", "subcommand",
                                                                               "verbose")})


def test_run_sections_come_from_the_stage_configs_with_the_runs_own_defaults():
    cfg = RunConfig()
    assert isinstance(cfg.score, ScoreConfig) and isinstance(cfg.train, TrainConfig)
    assert (cfg.score.batch_size, cfg.train.lr, cfg.train.batch_size, cfg.data.pool_size, cfg.eval.batch_size) == \
        (8, 2e-4, 8, 384, 16)
    assert cfg.score.eta == ScoreConfig().eta and cfg.select == dataclasses.replace(SelectConfig(), run_dir="runs/main")
    assert CompareConfig().select.joint_rounds == 1 and cfg.select.joint_rounds == 0


def test_run_section_flags_yaml_and_common_options(tmp_path):
    y = tmp_path / "run.yaml"
    # jvp ranks by the inner product (it has no per-example norms for the default cosine ranking)
    y.write_text("model: m\nseed: 3\nscore: {batch-size: 2, method: jvp, data-score: inner}\ntrain:\n  lr: 1.0e-3\n")
    cfg = run_config(["--config", str(y), "--score.batch-size", "5", "--select.no-plot", "--run-dir", "r"])
    assert (cfg.score.batch_size, cfg.score.method, cfg.train.lr, cfg.select.plot) == (5, "jvp", 1e-3, False)
    # the common options are top-level and every section has them
    assert cfg.score.model == cfg.train.model == "m" and cfg.train.seed == cfg.data.seed == 3
    assert cfg.select.run_dir == cfg.eval.run_dir == "r" and cfg.select.model is None
    assert dataclasses.replace(cfg, device="cpu").warmup.device == "cpu"


@pytest.mark.parametrize("text, needle", [
    ("score: {model: x}\n", "score.model: model is a common option"),
    ("score: {pool: x}\n", "score.pool: set by the pipeline"),
    ("train: {lrr: 1}\n", "unknown option train.lrr"),
    ("score: 3\n", "expected a mapping"),
    ("score: {eta: small}\n", "score.eta: 'small' is not a number"),
    ("score: {order: 3}\n", "--order 3: use 1 or 2"),
])
def test_bad_run_sections_are_refused(tmp_path, text, needle):
    y = tmp_path / "run.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        run_config(["--config", str(y)])


def test_run_help_lists_the_section_flags_with_their_defaults():
    for cmd in ("run", "compare"):
        out = subprocess.run([sys.executable, "-m", "dualsft", cmd, "--help"], capture_output=True, text=True,
                             check=True).stdout
        flat = " ".join(out.split())
        assert "--score.batch-size INT" in flat and "--train.lr FLOAT" in flat and "--select.mask-sign" in flat
        assert "(default: 8)" in flat and "(default: 0.0002)" in flat
        assert "--score-batch-size" not in flat and "--train-method" not in flat


def test_stage_configs_refuse_bad_values():
    with pytest.raises(ConfigError, match=r"--max-length 0"):
        ScoreConfig(max_length=0)
    with pytest.raises(ConfigError, match=r"--lr -1"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"--joint-rounds -1"):
        SelectConfig(joint_rounds=-1)


def test_preset_release_resolves_the_release_settings_and_flags_win():
    from dualsft.cli import build_parser
    from dualsft.config import PRESETS, build_config, load_yaml, preset_values
    from dualsft.evaluation.compare import CompareConfig
    from dualsft.pipeline import RunConfig
    from dualsft.selection.select import SelectConfig

    parser, _ = build_parser()
    for command, cls in (("run", RunConfig), ("compare", CompareConfig)):
        args = vars(parser.parse_args([command, "--preset", "release", "--train.lr", "1e-4"]))
        cfg = build_config(cls, {k: v for k, v in args.items() if k not in ("_module", "command", "subcommand",
                                                                            "verbose")})
        assert cfg.template == "release" and cfg.score.template == "release" and cfg.eval.template == "release"
        assert cfg.select.mask_sign == "abs" and (cfg.select.quota_layer, cfg.select.quota_module) == (0.2, 0.2)
        assert cfg.train.max_grad_norm == 0.0 and cfg.score.prior_normalisation == "release"
        assert cfg.train.lr == 1e-4
        # the release is the paper's scoring formula, not the defaults' LESS form
        assert (cfg.score.precondition, cfg.score.data_params, cfg.score.data_score, cfg.score.target_gradient) == \
            ("none", "all", "inner", "mean")
    # an explicit flag wins over the preset
    cfg = build_config(RunConfig, {"preset": "release", "template": "chat", "select.mask_sign": "signed"})
    assert cfg.template == "chat" and cfg.select.mask_sign == "signed" and cfg.train.max_grad_norm == 0.0
    # a single stage's command takes its own section
    assert build_config(SelectConfig, {"preset": "release"}).mask_sign == "abs"
    assert build_config(RunConfig).select.mask_sign == "signed"  # no preset: the defaults
    # `dualsft score --preset release`: the paper's formula; a flag still wins; no preset: LESS's form
    paper = build_config(ScoreConfig, {"preset": "release"})
    assert (paper.precondition, paper.data_params, paper.data_score, paper.target_gradient) == \
        ("none", "all", "inner", "mean")
    assert build_config(ScoreConfig, {"preset": "release", "data_score": "cosine"}).data_score == "cosine"
    plain = build_config(ScoreConfig)
    assert (plain.precondition, plain.data_params, plain.data_score, plain.target_gradient) == \
        ("auto", "linear", "cosine", "normalized")
    # configs/release.yaml holds the same values
    from pathlib import Path

    assert load_yaml(Path(__file__).parents[1] / "configs" / "release.yaml") == PRESETS["release"]
    assert preset_values(RunConfig, "release") == PRESETS["release"]


def write_stage(run, folder, config):
    """A fabricated RUN/<folder>/metadata.json recording ``config`` (what a finished stage leaves)."""
    (run / folder).mkdir(parents=True)
    (run / folder / "metadata.json").write_text(json.dumps({"stage": folder, "config": config}))


def test_a_run_folders_recorded_settings_are_defaults_under_yaml_and_flags(tmp_path, caplog, monkeypatch):
    """defaults < RUN's recorded settings < YAML < flags; locations, --overwrite, a section's local options, a
    value of the wrong type and an unknown key are not taken; the settings taken are logged."""
    monkeypatch.chdir(tmp_path)  # so the default run folder (runs/main) is not this checkout's
    run = tmp_path / "run"
    write_stage(run, "data", {"run_dir": "elsewhere", "out": "x", "target_task": "products", "val_size": 4,
                              "seed": 0, "overwrite": True, "no_such_option": 1})
    write_stage(run, "warmup", {"run_dir": "elsewhere", "model": "some/model", "max_length": 640, "seed": 3,
                                "pool": "p.jsonl", "lr": 1e-3})
    write_stage(run, "scores", {"batch_size": 2, "eta": "not a number", "lambda_prior": 0.5})
    write_stage(run, "selection", {"joint_rounds": 0, "param_budget": 0.05, "out": "selection"})
    y = tmp_path / "c.yaml"
    y.write_text("score: {lambda_prior: 0.3}\n")
    cfg = run_config(["--run-dir", str(run), "--config", str(y), "--warmup.lr", "5e-4"])
    assert (cfg.model, cfg.max_length, cfg.seed, cfg.overwrite) == ("some/model", 640, 3, False)
    assert (cfg.data.target_task, cfg.data.val_size, cfg.data.out) == ("products", 4, "")
    assert (cfg.warmup.lr, cfg.warmup.pool, cfg.score.batch_size, cfg.score.eta) == (5e-4, "", 2, 2e-5)
    assert (cfg.score.lambda_prior, cfg.select.param_budget, cfg.run_dir) == (0.3, 0.05, str(run))
    assert "data.val_size=4" in caplog.text and "model='some/model'" in caplog.text
    assert "warmup.lr" not in caplog.text and "lambda_prior" not in caplog.text
    parser, _ = build_parser()
    args = vars(parser.parse_args(["compare", "--run-dir", str(run)]))
    compare = build_config(CompareConfig, {k: v for k, v in args.items() if k not in ("_module", "command",
                                                                                       "subcommand", "verbose")})
    assert (compare.data.val_size, compare.data.test_size, compare.select.param_budget) == (4, 256, 0.05)
    assert compare.select.joint_rounds == 1  # compare's dualsft-joint rounds: its own, not the recorded select's
    single = build_config(TrainConfig, {"run_dir": str(run)})  # train has not run: common options from warmup
    assert (single.model, single.max_length, single.lr) == ("some/model", 640, None)
    assert build_config(TrainConfig, {"run_dir": str(run)}, from_run=False).model == TrainConfig().model
    assert run_config([]) == RunConfig()  # no such run folder: the defaults
