"""Stage configs: one dataclass per stage is the single source of truth.

CLI flags (``--field-name``) and YAML files (``--config f.yaml`` with ``field_name: value``) are derived
from the dataclass fields; each field's ``metadata["help"]`` is its documentation. Precedence:
dataclass default < YAML file < explicit CLI flag. The user's objects are never mutated.

A config that runs several stages (``dualsft run``) holds each stage's config as a *section* field
(``section(...)``): YAML ``score: {batch_size: 8}`` and flags ``--score.batch-size 8`` are derived from
the stage's own dataclass, the common options (``CommonConfig``'s fields) stay top-level and are passed
down, and the fields one stage hands to the next (``wired``) are not options at all.
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
Template = Literal["chat", "plain", "release"]

# Named presets: option values under the defaults' layer (defaults < preset < YAML < CLI flags), keyed like a
# YAML file (top-level options, and one mapping per stage section). A single stage's command takes its own
# section's values ("select" -> SelectConfig). configs/<name>.yaml holds the same values for reading.
PRESETS: dict[str, dict[str, Any]] = {
    # the authors' release: plain prompt + "\n" + response, no end token, prompt masked by its own tokenisation;
    # |φ_param| top-k with 20%/20% quotas; no gradient clipping; v_prior divided by max(Σw, 1)
    "release": {"template": "release",
                "select": {"mask_sign": "abs", "quota_layer": 0.2, "quota_module": 0.2},
                "train": {"max_grad_norm": 0.0},
                "score": {"prior_normalisation": "release"}},
}


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
    template: Template = opt("chat", "chat: tokenizer's chat template; plain: prompt + '\\n' + response (+ EOS); "
                                     "release: prompt + '\\n' + response, no EOS (the authors' release)")
    max_length: int = opt(256, "truncate examples to this many tokens (truncations are reported)")
    drop_empty: bool = opt(False, "drop (with a warning) examples left with no response token instead of failing")
    assistant_turns: Literal["last", "all"] = opt("last", "chat (messages) records: last = loss on the final "
                                                  "assistant turn only; all = on every assistant turn (--template chat)")
    seed: int = opt(0, "random seed")
    overwrite: bool = opt(False, "replace an existing stage folder whose metadata differs")

    def __post_init__(self) -> None:
        require(self.template in get_args(Template), "template", self.template, "use chat, plain or release")
        require(self.max_length >= 1, "max-length", self.max_length, "must be at least 1")
        require(self.assistant_turns in ("last", "all"), "assistant-turns", self.assistant_turns, "use last or all")
        require(self.assistant_turns == "last" or self.template == "chat", "assistant-turns", self.assistant_turns,
                f"needs --template chat (got {self.template}): only a chat template marks each assistant turn")


def require(ok: bool, flag: str, value: Any, need: str) -> None:
    """Raise ConfigError naming ``--flag`` and the offending ``value`` unless ``ok`` (for ``__post_init__``)."""
    if not ok:
        raise ConfigError(f"--{flag} {value!r}: {need}")


def section(cls: type, help: str, wired: tuple[str, ...] = (), own: tuple[str, ...] = (), **defaults: Any) -> Any:
    """A field holding one stage's config ``cls`` inside a multi-stage config.

    ``defaults``: this config's own defaults where they differ from the stage's (declared once, here).
    ``wired``: the stage's fields the orchestrator sets itself (paths from one stage to the next); not options.
    ``own``: fields named like a common option that keep the stage's own meaning (not passed down).
    """
    return field(default=cls(**defaults), metadata={"help": help, "section": cls, "wired": wired, "own": own})


def section_fields(cls: type) -> list[dataclasses.Field]:
    """The section fields of a config class (empty for a single stage's config)."""
    return [f for f in dataclasses.fields(cls) if "section" in f.metadata]


def passed_down(f: dataclasses.Field) -> list[str]:
    """The common options a section takes from the top level."""
    mine = {g.name for g in dataclasses.fields(f.metadata["section"])}
    return [c.name for c in dataclasses.fields(CommonConfig) if c.name in mine and c.name not in f.metadata["own"]]


def section_options(f: dataclasses.Field) -> list[dataclasses.Field]:
    """The options of a section: its stage's fields less the common, the wired and the deprecated ones."""
    skip = {*passed_down(f), *f.metadata["wired"]}
    return [g for g in dataclasses.fields(f.metadata["section"]) if g.name not in skip and
            not g.metadata.get("deprecated")]


def pass_down_common(cfg: Any) -> None:
    """Give every section of ``cfg`` the top-level common options (``cfg.__post_init__`` calls this, so a
    section is always the config its stage runs with, the wired paths aside)."""
    for f in section_fields(type(cfg)):
        stage = getattr(cfg, f.name)
        shared = {n: getattr(cfg, n) for n in passed_down(f)}
        if any(getattr(stage, n) != v for n, v in shared.items()):
            object.__setattr__(cfg, f.name, dataclasses.replace(stage, **shared))


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
    parser.add_argument("--config", default=None, help="YAML file of option values (CLI flags win)")
    usable = sorted(n for n in PRESETS if preset_values(cls, n))
    if usable:
        parser.add_argument("--preset", default=argparse.SUPPRESS, choices=usable,
                            help="named settings under --config and the flags (which win); release: the authors' "
                                 "release settings (see dualsft.config.PRESETS)")
    sections = section_fields(cls)
    _add_flags(parser, cls, [f for f in dataclasses.fields(cls) if f not in sections], "", None)
    for f in sections:
        group = parser.add_argument_group(f"{f.name} section (YAML '{f.name}:')", f.metadata["help"])
        _add_flags(group, f.metadata["section"], section_options(f), f.name + ".", f.default)


def _add_flags(parser: Any, cls: type, fields: list[dataclasses.Field], prefix: str, defaults: Any) -> None:
    """``--<prefix><field-name>`` per field (dest ``<prefix><field_name>``); the help shows the default,
    read from ``defaults`` (a section's default config) when given."""
    hints = typing.get_type_hints(cls)
    for f in fields:
        tp, _ = _base_type(hints[f.name])
        dashed = f.name.replace("_", "-")
        default = f.default if defaults is None else getattr(defaults, f.name)
        helptext = f"{f.metadata.get('help', '')} (default: {default!r})"
        kw: dict[str, Any] = {"dest": prefix + f.name, "default": argparse.SUPPRESS, "help": helptext}
        if tp is bool:
            parser.add_argument(f"--{prefix}{dashed}", action="store_true", **kw)
            negative = f"--{prefix}no-{dashed}" if prefix else f"--no-{dashed}"
            parser.add_argument(negative, action="store_false", dest=prefix + f.name, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
        elif get_origin(tp) is Literal:
            choices = get_args(tp)
            parser.add_argument(f"--{prefix}{dashed}", type=type(choices[0]), choices=choices, **kw)
        elif tp in (int, float, str):
            parser.add_argument(f"--{prefix}{dashed}", type=tp, metavar=tp.__name__.upper(), **kw)
        else:
            parser.add_argument(f"--{prefix}{dashed}", type=str, **kw)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML options file (keys are field names, dashes allowed)."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--config {p}: file not found")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: expected a mapping of option: value")
    return {k.replace("-", "_"): {j.replace("-", "_"): w for j, w in v.items()} if isinstance(v, dict) else v
            for k, v in data.items()}


def build_config(cls: type[C], args: argparse.Namespace | dict[str, Any] | None = None, **overrides: Any) -> C:
    """Resolve a config: dataclass defaults < YAML (``args.config``) < CLI values < keyword overrides.

    A section's values come as YAML ``name: {field: value}`` or as flat ``name.field`` keys (the CLI's).
    Unknown keys raise ConfigError naming them and the valid options.
    """
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    given.pop("command", None)
    given.pop("func", None)
    yaml_path = given.pop("config", None)
    names = {f.name for f in dataclasses.fields(cls)}
    values = merge_layers(preset_values(cls, given.pop("preset", None)), load_yaml(yaml_path) if yaml_path else {})
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"--config {yaml_path}: unknown option(s) {unknown} for {cls.__name__}; "
                          f"valid: {sorted(names)}")
    sections = {f.name: f for f in section_fields(cls)}
    nested = {name: _section_values(f, values.pop(name, {}), str(yaml_path)) for name, f in sections.items()}
    values = check_yaml_values(cls, values, str(yaml_path))
    for key, v in [*given.items(), *overrides.items()]:
        name, dot, option = key.partition(".")
        if dot and name in sections:
            nested[name][option] = v
        else:
            values[key] = v
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
    for name, f in sections.items():
        if name not in values:
            values[name] = dataclasses.replace(f.default, **_checked_options(f, nested[name]))
    return cls(**values)


def preset_values(cls: type, name: str | None) -> dict[str, Any]:
    """The preset's values that ``cls`` has, shaped like a YAML file of ``cls`` ({} for no preset)."""
    if not name:
        return {}
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: use one of {sorted(PRESETS)}")
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, v in PRESETS[name].items():
        if isinstance(v, dict) and key in names:
            out[key] = dict(v)
        elif isinstance(v, dict) and cls.__name__ == f"{key.capitalize()}Config":  # the stage's own command
            out.update({k: w for k, w in v.items() if k in names})
        elif not isinstance(v, dict) and key in names:
            out[key] = v
    return out


def merge_layers(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """YAML-shaped values of ``high`` over ``low`` (section mappings merged key by key)."""
    out = dict(low)
    for k, v in high.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _section_values(f: dataclasses.Field, values: Any, where: str) -> dict[str, Any]:
    """A section's YAML mapping, checked like top-level YAML values."""
    if not isinstance(values, dict):
        raise ConfigError(f"--config {where}: {f.name}: expected a mapping of option: value, got {values!r}")
    return check_yaml_values(f.metadata["section"], _checked_options(f, values, f"--config {where}: "), where,
                             f.name + ".")


def _checked_options(f: dataclasses.Field, values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``values`` if every key is an option of section ``f``, else ConfigError saying where the key belongs."""
    options = {g.name for g in section_options(f)}
    for key in values:
        if key in passed_down(f):
            raise ConfigError(f"{where}{f.name}.{key}: {key} is a common option; set it at the top level")
        if key in f.metadata["wired"]:
            raise ConfigError(f"{where}{f.name}.{key}: set by the pipeline itself (from one stage to the next)")
        if key not in options:
            raise ConfigError(f"{where}unknown option {f.name}.{key}; valid: {sorted(options)}")
    return dict(values)


def check_yaml_values(cls: type, values: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """A copy of ``values`` read from YAML with each value checked against its field's type (argparse does
    this for flags): Literal choices, bool, int, float (YAML reads ``1e-3`` as a string), str. ``prefix``
    (a section's ``name.``) goes before each option name in the messages."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, v in values.items():
        tp, optional = _base_type(hints[name])
        if v is None and optional:
            continue
        bad = ConfigError(f"--config {where}: {prefix}{name}: {v!r} is not {_type_words(tp)}")
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
