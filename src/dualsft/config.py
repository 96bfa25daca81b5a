"""Stage configs: one dataclass per stage is the single source of truth.

CLI flags (``--field-name``) and YAML files (``--config f.yaml`` with ``field_name: value``) are derived
from the dataclass fields; each field's ``metadata["help"]`` is its documentation. Precedence:
dataclass default < YAML file < explicit CLI flag. The user's objects are never mutated.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from dualsft.errors import ConfigError

C = TypeVar("C")


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and a help text (used for --help and docs)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class CommonConfig:
    """Options every model-using stage shares."""

    run_dir: str = opt("runs/default", "run folder; each stage writes RUN/<stage>/")
    model: str = opt("smollm2-135m", "HF model id or local folder; 'smollm2-135m' = embedded SmolLM2-135M-Instruct")
    dtype: str = opt("auto", "auto (bf16 on CUDA, float32 on CPU), float32, float64, bfloat16")
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    template: Literal["chat", "plain"] = opt("chat", "chat: tokenizer's chat template; plain: prompt + '\\n' + response")
    max_length: int = opt(256, "truncate examples to this many tokens (truncations are reported)")
    drop_empty: bool = opt(False, "drop (with a warning) examples left with no response token instead of failing")
    seed: int = opt(0, "random seed")
    overwrite: bool = opt(False, "replace an existing stage folder whose metadata differs")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip Optional[...]; return (type, is_optional)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--field-name`` flag per dataclass field (defaults left as SUPPRESS so YAML can fill in)."""
    hints = typing.get_type_hints(cls)
    parser.add_argument("--config", default=None, help="YAML file of option values (CLI flags win)")
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        helptext = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": helptext}
        if tp is bool:
            parser.add_argument(flag, action="store_true", **kw)
            parser.add_argument("--no-" + f.name.replace("_", "-"), action="store_false", dest=f.name,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif get_origin(tp) is Literal:
            choices = get_args(tp)
            parser.add_argument(flag, type=type(choices[0]), choices=choices, **kw)
        elif tp in (int, float, str):
            parser.add_argument(flag, type=tp, metavar=tp.__name__.upper(), **kw)
        else:
            parser.add_argument(flag, type=str, **kw)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML options file (keys are field names, dashes allowed)."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--config {p}: file not found")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: expected a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type[C], args: argparse.Namespace | dict[str, Any] | None = None, **overrides: Any) -> C:
    """Resolve a config: dataclass defaults < YAML (``args.config``) < CLI values < keyword overrides.

    Unknown keys raise ConfigError naming them and the valid options.
    """
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    given.pop("command", None)
    given.pop("func", None)
    yaml_path = given.pop("config", None)
    names = {f.name for f in dataclasses.fields(cls)}
    values = load_yaml(yaml_path) if yaml_path else {}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"--config {yaml_path}: unknown option(s) {unknown} for {cls.__name__}; "
                          f"valid: {sorted(names)}")
    values = check_yaml_values(cls, values, str(yaml_path))
    values.update(given)
    values.update(overrides)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
    return cls(**values)


def check_yaml_values(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of ``values`` read from YAML with each value checked against its field's type (argparse does
    this for flags): Literal choices, bool, int, float (YAML reads ``1e-3`` as a string), str."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, v in values.items():
        tp, optional = _base_type(hints[name])
        if v is None and optional:
            continue
        bad = ConfigError(f"--config {where}: {name}: {v!r} is not {_type_words(tp)}")
        if get_origin(tp) is Literal:
            if v not in get_args(tp):
                raise bad
        elif tp is bool:
            if not isinstance(v, bool):
                raise bad
        elif tp in (int, float):
            if isinstance(v, bool):
                raise bad
            try:
                out[name] = tp(v) if isinstance(v, str) else v
            except ValueError:
                raise bad from None
            if tp is int and not isinstance(out[name], int):
                raise bad
        elif tp is str and not isinstance(v, str):
            if isinstance(v, (dict, list)):
                raise bad
            out[name] = str(v)
    return out


def _type_words(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
