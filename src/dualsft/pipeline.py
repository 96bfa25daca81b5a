"""`dualsft run`: the whole pipeline in one command (the README's first command).

data build -> warmup -> score -> select -> train -> eval (base vs tuned) -> RUN/report.md with plots.
Each stage is the same module the individual commands run (``main(cfg)``), configured by its section of
one ``RunConfig`` (dualsft.stages: ``--score.batch-size 8`` or YAML ``score: {batch_size: 8}``); every
stage folder keeps its own metadata.json, so a rerun resumes completed stages and refuses a folder made
with other settings (``--overwrite`` replaces it). The defaults and why they differ from the stages' own
are in dualsft.stages.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from dualsft.io import atomic_write_text, read_json, read_jsonl, write_json
from dualsft.report import fmt_stat, get, histogram_plot, markdown_table
from dualsft.runs import portable_path
from dualsft.selection.report import composition_table
from dualsft.stages import RunConfig, builds_data, data_sources, refuse_multiprocess, run_stage, stage_config

HELP = "run the whole pipeline (data, warm-up, scoring, selection, restricted training, evaluation, report)"
log = logging.getLogger(__name__)
CONFIG = RunConfig


def main(cfg: RunConfig) -> int:
    from dualsft.data import build
    from dualsft.evaluation import evaluate
    from dualsft.scoring import score, warmup
    from dualsft.selection import select
    from dualsft.training import train

    refuse_multiprocess("run")
    t0 = time.time()
    run = Path(cfg.run_dir)
    sources = data_sources(cfg)
    timings: dict[str, float] = {}
    if builds_data(cfg):
        run_stage("data build", build.main, cfg.data, timings)
    pool, val = sources["pool"], sources["val"]
    run_stage("warmup", warmup.main, stage_config(cfg.warmup, pool=pool), timings)
    run_stage("score", score.main, stage_config(cfg.score, pool=pool, target=val), timings)
    run_stage("select", select.main, cfg.select, timings)
    run_stage("train", train.main, cfg.train, timings)
    # --data-dir as given ("" = RUN/data, eval's own default), so `dualsft eval --run-dir RUN` finds the same config
    run_stage("eval", evaluate.main, stage_config(cfg.eval, data_dir=cfg.data_dir, test=cfg.test), timings)
    timings["total"] = round(time.time() - t0, 1)
    write_json(run / "timings.json", timings)
    report = write_report(run, timings)
    print(f"\nreport: {report}")
    return 0


def write_report(run: Path, timings: dict[str, float]) -> Path:
    """RUN/report.md: base vs tuned metrics, selection and training summaries, plots."""
    metrics = read_json(run / "eval" / "metrics.json")["models"]
    sel = read_json(run / "selection" / "summary.json")
    scores = read_json(run / "scores" / "summary.json")
    plots = run_plots(run)
    rows = []
    for label, path, pct in [("target accuracy (exact match)", ("target", "accuracy"), True),
                             ("target loss", ("target", "loss"), False),
                             ("stability accuracy (other tasks)", ("stability", "all", "accuracy"), True),
                             ("stability loss (other tasks)", ("stability", "all", "loss"), False),
                             ("general text loss (HumanEval solutions)", ("general", "all", "loss"), False),
                             ("KL(base ‖ tuned), target", ("target", "kl"), False),
                             ("KL(base ‖ tuned), general text", ("general", "all", "kl"), False)]:
        base, tuned = get(metrics.get("base"), *path), get(metrics.get("tuned"), *path)
        if base is None and tuned is None:
            continue
        rows.append([label, fmt_stat(base, pct=pct), fmt_stat(tuned, pct=pct)])
    lines = [f"# dualsft run report: {portable_path(run)}\n",
             "## Base vs tuned\n", markdown_table(["metric", "base", "tuned (DualSFT)"], rows),
             "\nMeans ± standard deviation over examples, n examples. Exact match uses the task's own scorer on greedy "
             "generations.\n",
             "## What was selected\n", val_size_line(scores), *selection_lines(sel, scores),
             "", "## Time per stage (s)\n", markdown_table(list(timings), [[str(v) for v in timings.values()]]),
             "## Plots\n"]
    lines += [f"![{p.stem}]({p.relative_to(run)})" for p in plots]
    path = run / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def val_size_line(scores: dict) -> str:
    """One line on the size of V (the scoring target, from RUN/scores/summary.json): this quick run's is
    small, compare's is not."""
    n = scores.get("target_size")
    return (f"- V (validation split, the scoring target): {n if n is not None else '?'} examples. This run is sized "
            "for minutes; `dualsft compare` uses ≥ 256 (a small V can be skewed by answer type: issue 13).\n")


def selection_lines(sel: dict, scores: dict) -> list[str]:
    """Markdown lines: budgets, the subset's composition by pool task, the mask by module group."""
    data, param = sel.get("data", {}), sel.get("param", {})
    lines = [f"- data: {data.get('selected')} of {data.get('N')} pool examples (budget {data.get('budget')}, "
             f"{data.get('chosen_by', 'top-b of φ_data')})",
             f"- parameters: {param.get('selected'):,} of {param.get('d'):,} entries (density "
             f"{100 * (param.get('density') or 0):.1f}%, quotas layer {param.get('quota_layer')} / module "
             f"{param.get('quota_module')}, {param.get('granularity')})" if param.get("d") else "- parameters: —",
             f"- scoring: order {scores.get('order')}, method {scores.get('method')}, uᵀG = {scores.get('uTG'):.6g}, "
             f"Σφ_param = {scores.get('sum_param'):.6g}, Σφ_data = {scores.get('sum_data'):.6g} (row–column identity)",
             ""]
    overlap = data.get("overlap") or {}
    if overlap.get("task"):
        lines += ["Subset composition by pool task:\n", *composition_table(overlap, "task"), ""]
    if overlap.get("answer_type"):
        lines += ["Subset composition by answer type (task/answer type):\n", *composition_table(overlap, "answer_type"),
                  ""]
    groups = param.get("per_group") or {}
    if groups:
        def count(v: Any) -> Any:
            return v.get("selected", v.get("count")) if isinstance(v, dict) else v

        rows = [[g, f"{count(v):,}" if isinstance(count(v), int) else str(count(v))] for g, v in groups.items()]
        lines += ["Mask entries by module group:\n", markdown_table(["group", "entries"], rows)]
    return lines


def run_plots(run: Path) -> list[Path]:
    """Collect the stages' PNGs and draw the score distribution (selected vs not)."""
    rows = read_jsonl(run / "scores" / "data_scores.jsonl")
    chosen = {r["index"] for r in read_jsonl(run / "selection" / "subset.jsonl")}
    hist = run / "data_score_hist.png"
    histogram_plot(hist, {"not selected": [r["score"] for r in rows if r["index"] not in chosen],
                          "selected": [r["score"] for r in rows if r["index"] in chosen]},
                   "φ_data (predicted drop of the validation objective)", "data scores")
    found = [p for p in (run / "train" / "loss_curve.png", run / "selection" / "mask_density.png") if p.exists()]
    return [hist, *found]
