"""The model card (README.md) `dualsft merge` writes into the merged folder.

``model_card(CardInputs) -> str`` is pure formatting of the JSON the stages wrote; ``read_card_inputs``
gathers those files (train/adapter.json, the selection the training used, eval metrics of this very
training run, each stage's metadata.json for the command lines).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualsft.config import recorded_config
from dualsft.io import read_json
from dualsft.report import fmt_stat, get, markdown_table

# stage folder -> the command that writes it, in pipeline order (eval last: it reads the train folder)
STAGE_COMMANDS = (("data", "data build"), ("warmup", "warmup"), ("scores", "score"))
METRIC_ROWS = (("target accuracy (exact match)", ("target", "accuracy"), True),
               ("target loss", ("target", "loss"), False),
               ("stability accuracy (other tasks)", ("stability", "all", "accuracy"), True),
               ("stability loss (other tasks)", ("stability", "all", "loss"), False),
               ("general text loss", ("general", "all", "loss"), False),
               ("KL(base ‖ tuned), target", ("target", "kl"), False))


@dataclass
class CardInputs:
    """What the card says, read from the run folder.

    Attributes:
        base_model: θ0's id or path; ``hub_base``: whether it is a Hub id (then it goes in the card's metadata).
        train: train/adapter.json. selection: the selection's summary.json (None: no selection was used).
        metrics: {"base": ..., "tuned": ...} from eval/metrics.json of this training run (None: no eval).
        commands: the command lines, in order.
    """

    base_model: str
    train: dict
    hub_base: bool = False
    selection: dict | None = None
    metrics: dict | None = None
    commands: list[str] = field(default_factory=list)


def command_line(words: str, cls: type, config: dict[str, Any]) -> str:
    """``dualsft <words>`` with a flag for each option of ``config`` that differs from ``cls``'s default."""
    parts = ["dualsft", *words.split()]
    for f in dataclasses.fields(cls):
        if f.name not in config or config[f.name] == f.default or config[f.name] is None:
            continue
        flag, v = f.name.replace("_", "-"), config[f.name]
        if isinstance(v, bool):
            parts.append(f"--{flag}" if v else f"--no-{flag}")
        else:
            parts += [f"--{flag}", shlex.quote(str(v))]
    return " ".join(parts)


def budget_lines(train: dict, selection: dict | None) -> list[str]:
    """Markdown bullets: the data and parameter budgets and the training run."""
    mask, cfg, res = train.get("mask") or {}, train.get("training") or {}, train.get("result") or {}
    data = (selection or {}).get("data") or {}
    param = (selection or {}).get("param") or {}
    if cfg.get("data") == "all" or not data:
        lines = ["- data: every example of the training file (no data selection)"]
    else:
        lines = [f"- data: {data.get('selected')} of {data.get('N')} pool examples (budget {data.get('budget')}, "
                 f"{data.get('chosen_by', 'top-b of φ_data')})"]
    if mask.get("kind") == "mask":
        quotas = (f"; quotas layer {param.get('quota_layer')} / module {param.get('quota_module')}, "
                  f"{param.get('granularity')} granularity" if param else "")
        lines.append(f"- parameters: {mask['k']:,} of {mask['d']:,} weight entries trained "
                     f"({100 * mask['k'] / mask['d']:.2f}%, budget {param.get('budget', '?')}{quotas})")
    elif train.get("method") == "lora":
        lines.append(f"- parameters: LoRA r={cfg.get('lora_r')}, alpha={cfg.get('lora_alpha')} (baseline, no mask)")
    else:
        lines.append(f"- parameters: all {mask.get('d', 0):,} entries (full fine-tuning, no mask)")
    lines.append(f"- training: {train.get('method')} from the base weights, {res.get('steps')} optimizer steps, "
                 f"{res.get('tokens')} tokens, lr {cfg.get('lr')}, batch {cfg.get('batch_size')}, {cfg.get('epochs')} "
                 f"epoch(s), weights {train.get('weights_dtype')}, final training loss {fmt_stat(res.get('final_loss'))}")
    return lines


def composition_lines(selection: dict | None) -> list[str]:
    """The subset's composition by pool task (and answer type) beside the pool's; [] if not recorded."""
    from dualsft.selection.report import composition_table

    overlap = get(selection, "data", "overlap") or {}
    lines = []
    if overlap.get("task"):
        lines += ["## Training subset by task\n", *composition_table(overlap, "task"), ""]
    if overlap.get("answer_type"):
        lines += ["By answer type (task/answer type):\n", *composition_table(overlap, "answer_type"), ""]
    return lines


def metric_lines(metrics: dict | None) -> list[str]:
    """Base vs tuned table of the eval stage; [] without one."""
    if not metrics:
        return []
    rows = [[label, fmt_stat(get(metrics.get("base"), *path), pct=pct), fmt_stat(get(metrics["tuned"], *path), pct=pct)]
            for label, path, pct in METRIC_ROWS
            if get(metrics.get("base"), *path) is not None or get(metrics["tuned"], *path) is not None]
    if not rows:
        return []
    return ["## Evaluation (`dualsft eval`)\n", markdown_table(["metric", "base", "this model"], rows),
            "Means ± standard deviation over examples (n examples); exact match uses each task's own scorer "
            "on greedy generations.\n"]


def model_card(c: CardInputs) -> str:
    """The README.md text of a merged model folder."""
    front = ["---", "library_name: transformers", *([f"base_model: {c.base_model}"] if c.hub_base else []),
             "tags:", "- dualsft", "- sparse-fine-tuning", "---", ""]
    intro = (f"Fine-tuned from `{c.base_model}` with **DualSFT** (dualsft's docs/method.md): the training "
             "examples and the weight entries to update are chosen jointly from one set of gradient statistics "
             "(φ_data, φ_param), then only those entries of the base weights are trained. This folder is the "
             "full merged model (base + trained delta); it loads with `AutoModelForCausalLM.from_pretrained`.\n")
    lines = [*front, "# DualSFT fine-tuned model\n", intro, "## Budgets\n", *budget_lines(c.train, c.selection), "",
             *composition_lines(c.selection), *metric_lines(c.metrics)]
    if c.commands:
        lines += ["## How it was made\n",
                  "Equivalent stage commands (rebuilt from each stage's metadata.json; options at their defaults "
                  "are omitted):\n", "```bash", *c.commands, "```"]
    return "\n".join(lines).rstrip() + "\n"


def is_hub_id(model: str) -> bool:
    """``org/name`` that is not a local folder (only those belong in the card's ``base_model``)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", model)) and not Path(model).exists()


def read_card_inputs(run_dir: Path, train_dir: Path, merge_command: str) -> CardInputs:
    """Gather the card's inputs from the run folder (missing optional stages are left out)."""
    import importlib

    from dualsft.cli import COMMANDS

    train = read_json(train_dir / "adapter.json")
    sel_dir = selection_dir(train.get("training") or {})
    selection = read_json(sel_dir / "summary.json") if sel_dir is not None else None
    folders = [*((run_dir / d, w) for d, w in STAGE_COMMANDS), *([(sel_dir, "select")] if sel_dir else []),
               (train_dir, "train")]
    metrics, eval_dir = eval_metrics(run_dir, train_dir)
    if metrics is not None:
        folders.append((eval_dir, "eval"))
    commands = []
    for folder, words in folders:
        config = recorded_config(folder.parent, folder.name)  # {} when the stage did not run (or is unreadable)
        if config:
            commands.append(command_line(words, importlib.import_module(COMMANDS[words]).CONFIG, config))
    base = (train.get("base_model") or {}).get("id", "")
    return CardInputs(base, train, is_hub_id(base), selection, metrics, [*commands, merge_command])


def selection_dir(train_config: dict) -> Path | None:
    """The `dualsft select` folder the training read its mask (or subset) from; None if it used neither."""
    for key in ("mask", "train_file"):
        value = train_config.get(key)
        if value and value != "none" and (Path(value).parent / "summary.json").exists():
            return Path(value).parent
    return None


def eval_metrics(run_dir: Path, train_dir: Path) -> tuple[dict | None, Path]:
    """{"base", "tuned"} of RUN/eval if it evaluated exactly these trained weights (path and fingerprint)."""
    from dualsft.evaluation.evaluate import run_fingerprint

    eval_dir = run_dir / "eval"
    if not (eval_dir / "metrics.json").exists() or not (eval_dir / "metadata.json").exists():
        return None, eval_dir
    evaluated = read_json(eval_dir / "metadata.json").get("train_dirs") or {}
    models = read_json(eval_dir / "metrics.json").get("models") or {}
    for path, fp in evaluated.items():
        if Path(path).resolve() == train_dir.resolve() and fp == run_fingerprint(train_dir):
            key = "tuned" if len(evaluated) == 1 else f"tuned:{path}"
            if key in models:
                return {"base": models.get("base"), "tuned": models[key]}, eval_dir
    return None, eval_dir
