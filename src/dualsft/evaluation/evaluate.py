"""`dualsft eval`: target accuracy/loss and stability (forgetting) of a tuned model against its base.

What is measured (every number is ``{"mean", "std", "n"}``; std over examples within a run):
    target     on test.jsonl (the target task): ``loss`` (token-mean response NLL l(z; θ), mean over
               examples), ``accuracy`` (exact match: task scorer == 1 on the greedy generation),
               ``score`` (the task scorer's mean, which gives partial credit on some tasks), and
               ``kl`` (token-mean KL(base ‖ tuned) on the response tokens) when a reference is loaded
    stability  the same per held-out OTHER task of stability.jsonl, plus ``all`` pooled over those tasks
    general    non-task text of stability.jsonl (HumanEval prompt + canonical solution): loss, kl, and
               with ``--humaneval`` pass@1 of greedy completions, executed only in a subprocess; per set
               and ``all`` pooled
Generation is greedy, batched with left padding, stops at EOS / end of turn, ``--max-new-tokens``.

Outputs in ``--out`` (default RUN/eval): ``metrics.json`` ({"models": {label: tree}} with labels
"tuned" and "base", plus "across_runs" when several --train-dir are given), ``predictions.jsonl``
(one row per model and example) and ``metadata.json``.

Public Python API (stable; the comparison harness calls it):
    evaluate_model(model, tokenizer, base_model, data_dir, cfg) -> {"metrics": tree, "predictions": rows}
    load_eval_sets(data_dir) -> EvalSets
    EvalConfig                 the stage config (also used by evaluate_model for template, sizes, ...)
    summarise, aggregate_runs  (dualsft.evaluation.metrics)
    score_answer               (dualsft.data.tasks)
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dualsft.config import CommonConfig, opt, require
from dualsft.data.formats import Example, TokenizedExample, collate, load_examples, tokenize_examples
from dualsft.data.tasks import extract_answer, score_answer
from dualsft.errors import ArtifactError, ConfigError
from dualsft.evaluation.generate import generate_texts, greedy_generate
from dualsft.evaluation.humaneval import check_completion, truncate_completion
from dualsft.evaluation.metrics import aggregate_runs, per_example_kl, summarise
from dualsft.io import write_json, write_jsonl
from dualsft.losses import IGNORE_INDEX, per_example_loss_from_logits
from dualsft.models import load_model, load_tokenizer, model_fingerprint
from dualsft.runs import build_metadata, file_fingerprint, portable_path, prepare_stage_dir

__all__ = ["EvalConfig", "EvalSets", "evaluate_model", "load_eval_sets", "summarise", "aggregate_runs",
           "score_answer", "main"]

log = logging.getLogger(__name__)

HELP = "evaluate a tuned run against its base: target accuracy/loss, stability on other tasks, KL, HumanEval"
GENERAL_TASKS = ("humaneval",)  # stability records scored by loss/KL (and pass@1), not by an answer scorer


@dataclass(frozen=True)
class EvalConfig(CommonConfig):
    """Options of `dualsft eval`. --model is the base model (the trained delta/adapter is applied to it),
    or, without a trained run, the model to evaluate (e.g. a merged folder)."""

    data_dir: str = opt("", "folder with test.jsonl and stability.jsonl; empty = RUN/data")
    test: str = opt("", "the test split instead of DATA_DIR/test.jsonl: a file, a saved dataset FOLDER[@split] or "
                        "hf://owner/name[:config][@split] (+ ?prompt=COL&response=COL)")
    train_dir: str = opt("auto", "trained run(s) to evaluate: folder(s) with delta.safetensors or a LoRA adapter/, "
                                 "comma-separated for several seeds; 'auto' = RUN/train if it holds one; "
                                 "'none' = evaluate --model itself")
    base_model: str = opt("", "reference model for KL(base‖tuned) and the base metrics; empty = --model when a "
                              "trained run is applied to it, else none")
    out: str = opt("", "output folder; empty = RUN/eval")
    eval_base: bool = opt(True, "also report the reference (base) model's own metrics next to the tuned ones")
    batch_size: int = opt(16, "examples per forward / generation batch")
    max_new_tokens: int = opt(8, "generation budget for task answers (they are a few tokens)")
    max_examples: int = opt(0, "use at most this many examples per split and task (0: all)")
    humaneval: bool = opt(False, "also HumanEval pass@1 on the stability set's HumanEval records (run in a subprocess)")
    humaneval_max_new_tokens: int = opt(128, "generation budget for a HumanEval completion")
    humaneval_timeout: float = opt(5.0, "seconds before a HumanEval program is killed (counted as failed)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.batch_size >= 1, "batch-size", self.batch_size, "must be at least 1")
        require(self.max_examples >= 0, "max-examples", self.max_examples, "use 0 (all) or a cap")
        require(self.humaneval_timeout > 0, "humaneval-timeout", self.humaneval_timeout, "must be positive")


CONFIG = EvalConfig


@dataclass
class EvalSets:
    """Evaluation examples: the target task's test split, the other tasks, and general text.

    Attributes:
        target_task: task name of the test split (from its records' ``task``; "target" if absent).
        target: test examples.
        stability: {task: examples} of held-out other tasks (answer-scored).
        general: {name: examples} of general text (loss / KL; HumanEval also pass@1).
    """

    target_task: str
    target: list[Example]
    stability: dict[str, list[Example]]
    general: dict[str, list[Example]]


def load_eval_sets(data_dir: str | Path, max_examples: int = 0, test: str = "") -> EvalSets:
    """Read the test split (``test``, a data source, else ``data_dir/test.jsonl``: required) and
    ``stability.jsonl`` (optional) from ``data_dir``."""
    d = Path(data_dir)
    if not test and not (d / "test.jsonl").exists():
        raise ArtifactError(f"{d / 'test.jsonl'} is missing: run `dualsft data build` first or pass --data-dir "
                            "or --test")
    target = load_examples(test or d / "test.jsonl")
    tasks = {e.record.get("task", "target") for e in target}
    target_task = tasks.pop() if len(tasks) == 1 else "target"
    stability: dict[str, list[Example]] = defaultdict(list)
    general: dict[str, list[Example]] = defaultdict(list)
    if (d / "stability.jsonl").exists():
        for e in load_examples(d / "stability.jsonl"):
            task = str(e.record.get("task", "other"))
            (general if task in GENERAL_TASKS else stability)[task].append(e)
    cap = (lambda xs: xs[:max_examples]) if max_examples > 0 else (lambda xs: xs)
    return EvalSets(target_task, cap(target), {k: cap(v) for k, v in sorted(stability.items())},
                    {k: cap(v) for k, v in sorted(general.items())})


def response_batches(toks: list[TokenizedExample], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """LEFT-padded, length-sorted batches (input_ids, attention_mask, labels, index, position_ids [B, T]).

    Left padding puts every row's response at the end, so only the last K positions need logits.
    """
    order = sorted(range(len(toks)), key=lambda i: len(toks[i].input_ids))
    out = []
    for s in range(0, len(order), batch_size):
        b = collate([toks[i] for i in order[s : s + batch_size]], pad_id, padding_side="left")
        b["position_ids"] = (b["attention_mask"].cumsum(-1) - 1).clamp_min(0)  # absolute positions ignore pads
        out.append(b)
    return out


def window_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions, [B, keep, V] (all positions if the model cannot slice)."""
    kw: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                          "position_ids": batch["position_ids"], "use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = keep  # skips the LM head and softmax on prompt positions: most of the cost
    return model(**kw).logits[:, -keep:]


@torch.no_grad()
def losses_and_kl(model: torch.nn.Module, tokenizer: Any, examples: list[Example], cfg: EvalConfig,
                  base_model: torch.nn.Module | None = None, desc: str = "loss") -> tuple[dict[int, float], dict[int, float]]:
    """Per-example response loss l(z; θ) of ``model`` (as ``losses.per_example_loss``) and, with
    ``base_model``, token-mean KL(base ‖ model) on the response tokens.

    Returns ({index: loss}, {index: kl}) (the second empty without a base model).
    """
    toks = tokenize_examples(examples, tokenizer, cfg.template, cfg.max_length, cfg.drop_empty, source=desc,
                             assistant_turns=cfg.assistant_turns)
    device = next(model.parameters()).device
    loss, kl = {}, {}
    for b in tqdm(response_batches(toks, cfg.batch_size, tokenizer.pad_token_id), desc=desc, unit="batch", leave=False):
        b = {k: v.to(device) for k, v in b.items()}
        labelled = b["labels"].ne(IGNORE_INDEX)  # [B, T]; left padding puts the last response at the end
        span = labelled.shape[1] - labelled.float().argmax(-1)  # [B] first labelled token to the end (all turns)
        keep = min(int(span.max()) + 1, b["labels"].shape[1])  # +1: the position that predicts the first
        labels = b["labels"][:, -keep:]  # [B, keep]
        logits = window_logits(model, b, keep)  # [B, keep, V]
        idx = b["index"].tolist()
        loss.update(zip(idx, per_example_loss_from_logits(logits, labels).double().tolist()))
        if base_model is not None:
            kl.update(zip(idx, per_example_kl(window_logits(base_model, b, keep), logits, labels).double().tolist()))
    return loss, kl


def score_split(model: torch.nn.Module, tokenizer: Any, examples: list[Example], cfg: EvalConfig,
                base_model: torch.nn.Module | None, split: str, task: str) -> tuple[dict[str, Any], list[dict]]:
    """Loss, KL and greedy-generation scores of one task's examples: (metric summaries, prediction rows)."""
    loss, kl = losses_and_kl(model, tokenizer, examples, cfg, base_model, desc=f"{task} loss")
    gens = generate_texts(model, tokenizer, examples, cfg.template, cfg.max_length, cfg.max_new_tokens,
                          cfg.batch_size, desc=f"{task} generate")
    rows = []
    for e, g in zip(examples, gens):
        s = score_answer(e.record, g)
        rows.append({"split": split, "task": task, "index": e.index, "prompt": e.prompt_text[:300],
                     "reference": e.response, "generation": g,
                     "extracted": extract_answer(g), "score": s, "correct": s >= 1.0,
                     "loss": loss.get(e.index), "kl": kl.get(e.index)})
    return metric_block(rows), rows


def metric_block(rows: list[dict]) -> dict[str, Any]:
    """Summaries of the per-example rows: loss, accuracy, score (and kl, pass@1 when present)."""
    out = {"loss": summarise([r["loss"] for r in rows if r.get("loss") is not None])}
    if any("correct" in r for r in rows):
        out["accuracy"] = summarise([float(r["correct"]) for r in rows if "correct" in r])
        out["score"] = summarise([r["score"] for r in rows if "score" in r])
    if any(r.get("kl") is not None for r in rows):
        out["kl"] = summarise([r["kl"] for r in rows if r.get("kl") is not None])
    if any("passed" in r for r in rows):
        out["pass@1"] = summarise([float(r["passed"]) for r in rows if "passed" in r])
    return out


def humaneval_rows(model: torch.nn.Module, tokenizer: Any, examples: list[Example], cfg: EvalConfig) -> list[dict]:
    """Greedy completions of the raw HumanEval prompts (code continuation, the standard protocol; no chat
    template), each checked in a subprocess: rows with ``passed``."""
    ids = greedy_generate(model, tokenizer, [tokenizer(e.record["prompt"], add_special_tokens=False)["input_ids"]
                                             for e in examples],
                          cfg.humaneval_max_new_tokens, cfg.batch_size, desc="humaneval generate")
    rows = []
    for e, x in tqdm(list(zip(examples, ids)), desc="humaneval run", unit="problem", leave=False):
        completion = completion_from_generation(tokenizer.decode(x, skip_special_tokens=True), e.record)
        res = check_completion(e.record, completion, cfg.humaneval_timeout)
        rows.append({"split": "stability", "task": "humaneval", "index": e.index,
                     "task_id": e.record["humaneval"]["task_id"], "completion": completion,
                     "passed": res.passed, "status": res.status, "detail": res.detail})
    return rows


def completion_from_generation(text: str, record: dict) -> str:
    """A body to append to the prompt: a fenced or full-function answer is used whole (it redefines the
    stub; a docstring-only stub is valid Python), a plain continuation is cut at the next top-level line."""
    if text.lstrip().startswith("```"):  # a chat-style fenced answer: take the code inside the fence
        text = text.lstrip()[3:].split("```")[0]
        text = text[len("python"):] if text.startswith("python") else text
    if re.search(rf"^def {re.escape(record['humaneval']['entry_point'])}\s*\(", text, re.MULTILINE):
        return "\n" + text
    return truncate_completion(text)


def evaluate_model(model: torch.nn.Module, tokenizer: Any, base_model: torch.nn.Module | None,
                   data_dir: str | Path, cfg: EvalConfig | None = None) -> dict[str, Any]:
    """Evaluate one model on the data in ``data_dir`` (test.jsonl, stability.jsonl).

    Args:
        model: the model to evaluate (eval mode is set here and restored).
        base_model: reference θ0 for KL(base ‖ model); None skips KL.
        cfg: EvalConfig (template, max_length, batch_size, max_new_tokens, humaneval, ...); defaults if None.
    Returns:
        {"metrics": {"target": {"task", loss, accuracy, score[, kl]}, "stability": {task: {...}, "all": {...}},
         "general": {name: {loss[, kl][, pass@1]}, "all": {...}}}, "predictions": [row per example]}.
    """
    cfg = cfg or EvalConfig()
    sets = load_eval_sets(data_dir, cfg.max_examples, cfg.test)
    modes = [(m, m.training) for m in (model, base_model) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        target, rows = score_split(model, tokenizer, sets.target, cfg, base_model, "test", sets.target_task)
        metrics: dict[str, Any] = {"target": {"task": sets.target_task, **target}, "stability": {}, "general": {}}
        stab_rows: list[dict] = []
        for task, exs in sets.stability.items():
            metrics["stability"][task], r = score_split(model, tokenizer, exs, cfg, base_model, "stability", task)
            stab_rows += r
        if stab_rows:
            metrics["stability"]["all"] = metric_block(stab_rows)
        rows += stab_rows
        general_rows: list[dict] = []
        for name, exs in sets.general.items():
            loss, kl = losses_and_kl(model, tokenizer, exs, cfg, base_model, desc=f"{name} loss")
            grows = [{"split": "stability", "task": name, "index": e.index, "loss": loss.get(e.index),
                      "kl": kl.get(e.index)} for e in exs]
            if cfg.humaneval and name == "humaneval":
                passed = {r["index"]: r for r in humaneval_rows(model, tokenizer, exs, cfg)}
                grows = [{**g, **passed[g["index"]]} for g in grows]
            metrics["general"][name] = metric_block(grows)
            general_rows += grows
        if general_rows:
            metrics["general"]["all"] = metric_block(general_rows)
        rows += general_rows
    finally:
        for m, was_training in modes:
            m.train(was_training)
    return {"metrics": metrics, "predictions": rows}


# ----------------------------------------------------------------------------------------- orchestration


def resolve_train_dirs(cfg: EvalConfig) -> list[Path]:
    """The trained runs to evaluate ([] = evaluate --model itself)."""
    if cfg.train_dir in ("", "none"):
        return []
    if cfg.train_dir == "auto":
        d = Path(cfg.run_dir) / "train"
        found = has_trained_weights(d)
        log.info("--train-dir auto: %s", f"evaluating {d}" if found else f"no trained weights in {d}; evaluating --model")
        return [d] if found else []
    dirs = [Path(p.strip()) for p in cfg.train_dir.split(",") if p.strip()]
    for d in dirs:
        if not has_trained_weights(d):
            raise ArtifactError(f"--train-dir {d} holds neither delta.safetensors nor a LoRA adapter/ folder; "
                                "run `dualsft train` first or pass --train-dir none")
    return dirs


def has_trained_weights(path: Path) -> bool:
    """A delta file, a folder with delta.safetensors, or a folder with a peft adapter/."""
    return (path.is_file() and path.suffix == ".safetensors") or (path / "delta.safetensors").exists() or \
        (path / "adapter" / "adapter_config.json").exists()


def load_tuned(cfg: EvalConfig, train_dir: Path) -> torch.nn.Module:
    """--model with the trained delta (or merged LoRA adapter) of ``train_dir`` applied."""
    from dualsft.training.delta import apply_delta  # lazy: training is optional for eval of base models

    return apply_delta(load_model(cfg.model, cfg.dtype, cfg.device, attn_implementation="sdpa"), train_dir)


def run_fingerprint(train_dir: Path) -> str:
    """Fingerprint of a trained run's weights file(s)."""
    if train_dir.is_file():
        return file_fingerprint(train_dir)
    f = train_dir / "delta.safetensors"
    return file_fingerprint(f if f.exists() else train_dir / "adapter")


def main(cfg: EvalConfig) -> int:
    """CLI entry point: load models, evaluate, write metrics.json, predictions.jsonl and metadata.json."""
    t0 = time.time()
    data_dir = Path(cfg.data_dir) if cfg.data_dir else Path(cfg.run_dir) / "data"
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / "eval"
    train_dirs = resolve_train_dirs(cfg)
    if train_dirs and cfg.base_model and cfg.base_model != cfg.model:
        raise ConfigError("--base-model must equal --model when a trained run is applied to --model")
    base_id = cfg.base_model or (cfg.model if train_dirs else "")
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    base = load_model(base_id, cfg.dtype, cfg.device, attn_implementation="sdpa") if base_id else None
    base_fp = model_fingerprint(base) if base is not None else None
    data_files: dict[str, Any] = {k: data_dir / f"{k}.jsonl" for k in ("test", "stability")
                                  if (data_dir / f"{k}.jsonl").exists()}
    if cfg.test:
        data_files["test"] = cfg.test
    if "test" not in data_files:
        raise ArtifactError(f"{data_dir / 'test.jsonl'} is missing: run `dualsft data build` first or pass --data-dir "
                            "or --test")
    meta = build_metadata("eval", cfg, model_id=cfg.model, model_fingerprint=base_fp, data_files=data_files,
                          extra={"train_dirs": {portable_path(d): run_fingerprint(d) for d in train_dirs},
                                 "base_model": base_id or None})
    d = prepare_stage_dir(out.parent, out.name, meta, overwrite=cfg.overwrite)
    results: dict[str, Any] = {}
    predictions: list[dict] = []
    # "tuned" = evaluated against a reference; "model" = evaluated alone
    targets = [(f"tuned:{t}" if len(train_dirs) > 1 else "tuned", t) for t in train_dirs] or \
        [("tuned" if base is not None else "model", None)]
    for label, tdir in targets:
        model = load_tuned(cfg, tdir) if tdir is not None else load_model(cfg.model, cfg.dtype, cfg.device, "sdpa")
        log.info("evaluating %s", label)
        res = evaluate_model(model, tokenizer, base, data_dir, cfg)
        results[label] = res["metrics"]
        predictions += [{"model": label, **r} for r in res["predictions"]]
        del model
    if base is not None and cfg.eval_base:
        log.info("evaluating base %s", base_id)
        res = evaluate_model(base, tokenizer, None, data_dir, cfg)
        results["base"] = res["metrics"]
        predictions += [{"model": "base", **r} for r in res["predictions"]]
    metrics: dict[str, Any] = {"models": results, "wall_time_s": round(time.time() - t0, 1)}
    tuned = [k for k in results if k.startswith("tuned")]
    if len(tuned) > 1:
        metrics["across_runs"] = aggregate_runs([results[k] for k in tuned])
    write_json(d / "metrics.json", metrics)
    write_jsonl(d / "predictions.jsonl", predictions)
    print(summary_text(metrics, d))
    return 0


def summary_text(metrics: dict[str, Any], out: Path) -> str:
    """A few lines for the terminal: target accuracy/loss and stability per evaluated model."""
    lines = [f"eval written to {out / 'metrics.json'}"]
    for label, m in metrics["models"].items():
        t = m["target"]
        s = m["stability"].get("all", {})
        line = (f"  {label:>8}: target {t['task']} acc {t['accuracy']['mean']:.3f} (n={t['accuracy']['n']}) "
                f"loss {t['loss']['mean']:.3f}")
        if s:
            line += f" | stability acc {s['accuracy']['mean']:.3f} (n={s['accuracy']['n']})"
        for name, g in ((k, v) for k, v in m["general"].items() if k != "all"):
            line += f" | {name} loss {g['loss']['mean']:.3f}"
            if "kl" in g:
                line += f" kl {g['kl']['mean']:.4f}"
            if "pass@1" in g:
                line += f" pass@1 {g['pass@1']['mean']:.3f}"
        lines.append(line)
    return "\n".join(lines)
