"""Stage configs: one dataclass per stage is the single source of truth.

CLI flags (``--field-name``) and YAML files (``--config f.yaml`` with ``field_name: value``) are derived
from the dataclass fields; each field's ``metadata["help"]`` is its documentation. Precedence:
dataclass default < the run folder's recorded settings < preset < YAML file < explicit CLI flag. The user's
objects are never mutated.

A command that reuses a run folder (``--run-dir RUN``) takes the settings its stages recorded there
(RUN/<stage>/metadata.json "config") as its defaults (``recorded_values``): `dualsft run --data.target-task
products --run-dir R` then `dualsft compare --run-dir R` builds nothing new for R/data and trains the model R
was made with. Locations (PATH_OPTIONS) and --overwrite are never taken from a run folder. A flag the
user passes still wins; if it differs from what an already-run stage recorded, that stage refuses it
(MetadataMismatchError naming the field) unless --overwrite.

A config that runs several stages (``dualsft run``) holds each stage's config as a *section* field
(``section(...)``): YAML ``score: {batch_size: 8}`` and flags ``--score.batch-size 8`` are derived from
the stage's own dataclass, the common options (``CommonConfig``'s fields) stay top-level and are passed
down, and the fields one stage hands to the next (``wired``) are not options at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from dualsft.errors import ConfigError

log = logging.getLogger(__name__)
C = TypeVar("C")
# Options that name a file or folder (where things are, not how they are made): recorded relative to the
# working directory (runs.portable_path), not compared on reuse (what they point to is fingerprinted), never
# taken as a default from a run folder. Model ids (--model, --base-model) are recorded as given.
PATH_OPTIONS = ("run_dir", "out", "data_dir", "pool", "target", "subset", "mask", "train_file", "train_dir",
                "curvature")
Template = Literal["chat", "plain", "release"]

# Named presets: option values under the defaults' layer (defaults < preset < YAML < CLI flags), keyed like a
# YAML file (top-level options, and one mapping per stage section). A single stage's command takes its own
# section's values ("select" -> SelectConfig). configs/<name>.yaml holds the same values for reading.
# The paper's scoring formula (docs/method.md §4): u for one SGD step, φ_data = ⟨u, g_n⟩ over every trainable
# parameter, v_new the mean target gradient. `dualsft score`'s defaults are LESS's form instead (docs/method.md §4
# "Defaults of the scores"); `--preset release` and compare's `dualsft@paper` set these values.
PAPER_SCORE: dict[str, str] = {"precondition": "none", "data_params": "all", "data_score": "inner",
                               "target_gradient": "mean"}
# what scores made before a scoring option was recorded were made with: the paper's formula (the defaults then)
UNRECORDED_SCORE: dict[str, str] = {"score_tokens": "response", **PAPER_SCORE}
PRESETS: dict[str, dict[str, Any]] = {
    # the authors' release: plain prompt + "\n" + response, no end token, prompt masked by its own tokenisation;
    # |φ_param| top-k with 20%/20% quotas; no gradient clipping; v_prior divided by max(Σw, 1); the paper's
    # scoring formula (PAPER_SCORE)
    "release": {"template": "release",
                "select": {"mask_sign": "abs", "quota_layer": 0.2, "quota_module": 0.2},
                "train": {"max_grad_norm": 0.0},
                "score": {"prior_normalisation": "release", **PAPER_SCORE}},
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


def section(cls: type, help: str, wired: tuple[str, ...] = (), own: tuple[str, ...] = (),
            local: tuple[str, ...] = (), **defaults: Any) -> Any:
    """A field holding one stage's config ``cls`` inside a multi-stage config.

    ``defaults``: this config's own defaults where they differ from the stage's (declared once, here).
    ``wired``: the stage's fields the orchestrator sets itself (paths from one stage to the next); not options.
    ``own``: fields named like a common option that keep the stage's own meaning (not passed down).
    ``local``: options whose meaning is this command's own, never read from a run folder's recorded stage.
    """
    return field(default=cls(**defaults), metadata={"help": help, "section": cls, "wired": wired, "own": own,
                                                    "local": local})


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
                                 "release settings, the paper's scoring formula included (see "
                                 "dualsft.config.PRESETS)")
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


def build_config(cls: type[C], args: argparse.Namespace | dict[str, Any] | None = None, *, from_run: bool = True,
                 **overrides: Any) -> C:
    """Resolve a config: dataclass defaults < the run folder's recorded settings (``from_run``; see
    ``recorded_values``) < preset < YAML (``args.config``) < CLI values < keyword overrides.

    ``args`` holds only the values the user gave (the CLI's flags default to SUPPRESS). A section's values
    come as YAML ``name: {field: value}`` or as flat ``name.field`` keys (the CLI's). Unknown keys raise
    ConfigError naming them and the valid options.
    """
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    given.pop("command", None)
    given.pop("func", None)
    yaml_path = given.pop("config", None)
    names = {f.name for f in dataclasses.fields(cls)}
    values = merge_layers(preset_values(cls, given.pop("preset", None)), load_yaml(yaml_path) if yaml_path else {})
    if from_run:
        run_dir = overrides.get("run_dir", given.get("run_dir", values.get("run_dir")))
        values = with_recorded(cls, run_dir, values, {**given, **overrides})
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


# The run-folder stage each stage config records itself in (RUN/<folder>/metadata.json, "config").
STAGE_FOLDERS: dict[str, str] = {"DataBuildConfig": "data", "WarmupConfig": "warmup", "ScoreConfig": "scores",
                                 "SelectConfig": "selection", "TrainConfig": "train", "EvalConfig": "eval"}
# Where the common options (CommonConfig) are read from when the command's own stage has not run yet.
COMMON_SOURCES = ("warmup", "scores", "train", "eval")


def recorded_config(run_dir: str | Path, folder: str) -> dict[str, Any]:
    """The "config" RUN/<folder>/metadata.json recorded ({} when the stage has not run)."""
    path = Path(run_dir) / folder / "metadata.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text()).get("config")
    except (ValueError, AttributeError):  # unreadable: the stage itself says so when it reads the folder
        return {}
    return config if isinstance(config, dict) else {}


def recorded_values(cls: type, run_dir: str | Path) -> dict[str, Any]:
    """The settings of ``cls`` recorded in the run folder, shaped like a YAML file of ``cls`` ({} for none).

    A stage's own command reads RUN/<its folder>; a multi-stage config reads each section's stage folder;
    the common options come from the command's own stage, else the first of COMMON_SOURCES that ran.
    Never read: locations (PATH_OPTIONS), --overwrite, deprecated aliases, a section's ``local``
    options, a value of the wrong type (an older version's record), a key this version does not have.
    """
    skip = {*PATH_OPTIONS, "overwrite"}
    own = recorded_config(run_dir, STAGE_FOLDERS[cls.__name__]) if cls.__name__ in STAGE_FOLDERS else {}
    out = _typed(cls, own, {f.name for f in dataclasses.fields(cls) if not f.metadata.get("deprecated")} - skip)
    if issubclass(cls, CommonConfig) and not own:
        common = next((c for c in (recorded_config(run_dir, s) for s in COMMON_SOURCES) if c), {})
        out.update(_typed(cls, common, {f.name for f in dataclasses.fields(CommonConfig)} - skip))
    for f in section_fields(cls):
        stage = recorded_config(run_dir, STAGE_FOLDERS[f.metadata["section"].__name__])
        options = {g.name for g in section_options(f)} - skip - set(f.metadata.get("local", ()))
        if stage_values := _typed(f.metadata["section"], stage, options):
            out[f.name] = stage_values
    return out


def _typed(cls: type, recorded: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """The recorded values of ``names`` that ``cls``'s field types accept (checked like YAML values)."""
    out = {}
    for k in sorted(names & set(recorded)):
        try:
            out.update(check_yaml_values(cls, {k: recorded[k]}, "run folder"))
        except ConfigError:
            log.debug("recorded %s=%r does not fit this version's %s; not used", k, recorded[k], cls.__name__)
    return out


def with_recorded(cls: type, run_dir: str | None, values: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """``values`` (preset + YAML, YAML-shaped) over the run folder's recorded settings. Logs the recorded
    settings that change a default and that neither ``values`` nor ``flags`` (flat ``name`` /
    ``section.name`` keys, as the CLI gives them) set."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "run_dir" not in fields:
        return values
    run_dir = run_dir or fields["run_dir"].default
    recorded = recorded_values(cls, run_dir)
    taken = []
    for key, v in recorded.items():
        if not isinstance(v, dict):
            if key not in values and key not in flags and v != fields[key].default:
                taken.append(f"{key}={v!r}")
            continue
        for option, w in v.items():
            higher = values.get(key) if isinstance(values.get(key), dict) else {}
            if option not in higher and f"{key}.{option}" not in flags and w != getattr(fields[key].default, option):
                taken.append(f"{key}.{option}={w!r}")
    if taken:
        log.info("settings taken from the run folder %s (flags win): %s", run_dir, ", ".join(taken))
    return merge_layers(recorded, values)


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
