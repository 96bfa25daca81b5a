"""CLI and configs: flags derive from the dataclasses; YAML < flags; unknown options are refused."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass

import pytest

from dualsft.cli import COMMANDS, build_parser
from dualsft.config import CommonConfig, add_config_args, build_config, opt
from dualsft.errors import ConfigError


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
        import dataclasses

        for f in dataclasses.fields(mod.CONFIG):
            assert f.metadata.get("help"), f"{words}: option {f.name} has no help text"


def test_console_entry_point_lists_commands():
    out = subprocess.run([sys.executable, "-m", "dualsft", "--help"], capture_output=True, text=True, check=True).stdout
    assert "info" in out and "COMMAND" in out
    assert set(COMMANDS) >= {"run", "data build", "warmup", "score", "select", "train", "eval", "compare"}
