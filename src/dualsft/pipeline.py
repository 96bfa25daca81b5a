"""`dualsft run`: the whole pipeline in one command (the README's first command).

data build -> warmup -> score -> select -> train -> eval (base vs tuned) -> RUN/report.md with plots.
Each stage is the same module the individual commands run (``main(cfg)``), configured from this one
``RunConfig``; every stage folder keeps its own metadata.json, so a rerun resumes completed stages and
refuses a folder made with other settings (``--overwrite`` replaces it).

The defaults are sized for the embedded SmolLM2-135M on 2 CPU cores: a 384-example pool, 8 held-out
examples per stability task and 8 HumanEval records (the data build's own defaults are larger: 512/16/16;
with those, one measured run took 28 minutes on a 2-core machine shared with other jobs, scoring and
evaluation taking 13 and 12 minutes). They
deviate from the paper's training defaults (METHOD.md §5) where a CPU demo needs it, on purpose:
lr 2e-4 instead of 2e-5 and batch 8 instead of 64, because 10% of a 512-example pool for 3 epochs at
batch 64 would be 3 optimizer steps. Pass the paper's values to reproduce its setting at scale.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dualsft.config import CommonConfig, opt
from dualsft.errors import ConfigError
from dualsft.io import atomic_write_text, read_json, read_jsonl, write_json
from dualsft.report import fmt_stat, get, histogram_plot, markdown_table

HELP = "run the whole pipeline (data, warm-up, scoring, selection, restricted training, evaluation, report)"
log = logging.getLogger(__name__)
C = TypeVar("C")


@dataclass(frozen=True)
class RunConfig(CommonConfig):
    """Options of `dualsft run`. Data comes from --data-dir (pool/val/test/stability.jsonl) or is built."""

    run_dir: str = opt("runs/main", "run folder; each stage writes RUN/<stage>/ and the report goes to RUN/report.md")
    data_dir: str = opt("", "folder with pool.jsonl, val.jsonl, test.jsonl (and stability.jsonl); "
                            "empty: build the embedded reasoning-gym data into RUN/data")
    target_task: str = opt("chain_sum", "target task of the embedded data (see `dualsft data build --help`)")
    pool_size: int = opt(384, "pool size of the embedded data")
    val_size: int = opt(32, "target validation examples of the embedded data (used for scoring)")
    test_size: int = opt(64, "target test examples of the embedded data")
    stability_size: int = opt(8, "held-out examples per stability task of the embedded data")
    humaneval_size: int = opt(8, "HumanEval records in the stability set of the embedded data (0: none)")
    warmup_ratio: float = opt(0.1, "fraction of the pool for the warm-up (0: score at θ0, first order only)")
    order: int = opt(2, "scoring order: 2 (u = ηv − ½η²c⊙G) or 1 (u = ηv)")
    eta: float = opt(2e-5, "η of the one-step surrogate")
    lambda_prior: float = opt(0.2, "λ_prior of the KL-to-base stability term (0 skips the anchor pass)")
    score_batch_size: int = opt(8, "examples per scoring batch")
    score_method: str = opt("ghost", "row-score method: ghost, jvp or exact (the slow oracle)")
    data_budget: float = opt(0.1, "examples to train on: fraction of the pool or a count")
    param_budget: float = opt(0.1, "entries to train: fraction of all trainable entries or a count")
    joint_rounds: int = opt(0, "rounds of joint mask/subset refinement after the independent selection")
    train_method: str = opt("sparse", "sparse (DualSFT restricted), dense-masked, full or lora")
    lr: float = opt(2e-4, "learning rate of the restricted fine-tuning (paper: 2e-5 at batch 64 on 3B-9B)")
    epochs: int = opt(3, "epochs over the subset")
    batch_size: int = opt(8, "effective training batch (paper: 64)")
    micro_batch_size: int = opt(8, "examples per training forward/backward")
    eval_batch_size: int = opt(16, "examples per evaluation batch")
    eval_max_examples: int = opt(0, "cap per evaluation split and task (0: all)")


CONFIG = RunConfig


def stage_config(cls: type[C], cfg: RunConfig, **overrides: Any) -> C:
    """Build a stage's config from the run config: shared fields by name, then ``overrides``."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(CommonConfig) if f.name in names}
    values.update({k: v for k, v in overrides.items() if k in names})
    return cls(**values)


def data_build_config(cfg: RunConfig, seed: int | None = None) -> Any:
    """The `dualsft data build` config for the embedded data of this run."""
    from dualsft.data.build import DataBuildConfig

    return DataBuildConfig(run_dir=cfg.run_dir, target_task=cfg.target_task, pool_size=cfg.pool_size,
                           val_size=cfg.val_size, test_size=cfg.test_size, stability_size=cfg.stability_size,
                           humaneval_size=cfg.humaneval_size, seed=cfg.seed if seed is None else seed,
                           overwrite=cfg.overwrite)


def data_files(cfg: RunConfig) -> dict[str, Path]:
    """pool/val/test/stability paths (stability optional)."""
    d = Path(cfg.data_dir) if cfg.data_dir else Path(cfg.run_dir) / "data"
    files = {k: d / f"{k}.jsonl" for k in ("pool", "val", "test", "stability")}
    if cfg.data_dir:
        missing = [str(p) for k, p in files.items() if k != "stability" and not p.exists()]
        if missing:
            raise ConfigError(f"--data-dir {d} lacks {missing}; it needs pool.jsonl, val.jsonl and test.jsonl")
    return files


def refuse_multiprocess(command: str) -> None:
    """The pipeline's data, selection and eval stages are single-process: under torchrun, say what to do."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"`dualsft {command}` runs in one process; under torchrun run the multi-process stages "
                          "one by one (torchrun ... -m dualsft warmup / score / train), and data build, select and "
                          "eval without torchrun (see docs/scaling.md)")


def run_stage(name: str, fn: Any, cfg: Any, timings: dict[str, float]) -> None:
    """Run one stage's main(cfg), timing it; a non-zero exit code stops the pipeline."""
    log.info("=== %s ===", name)
    t0 = time.time()
    rc = fn(cfg)
    timings[name] = round(time.time() - t0, 1)
    if rc:
        raise SystemExit(rc)


def main(cfg: RunConfig) -> int:
    from dualsft.data import build
    from dualsft.evaluation import evaluate
    from dualsft.scoring import score, warmup
    from dualsft.selection import select
    from dualsft.training import train

    refuse_multiprocess("run")
    t0 = time.time()
    run = Path(cfg.run_dir)
    files = data_files(cfg)
    timings: dict[str, float] = {}
    if not cfg.data_dir:
        run_stage("data build", build.main, data_build_config(cfg), timings)
    pool, val = str(files["pool"]), str(files["val"])
    run_stage("warmup", warmup.main, stage_config(warmup.CONFIG, cfg, pool=pool, warmup_ratio=cfg.warmup_ratio),
              timings)
    run_stage("score", score.main, stage_config(
        score.CONFIG, cfg, pool=pool, target=val, order=cfg.order, eta=cfg.eta, lambda_prior=cfg.lambda_prior,
        batch_size=cfg.score_batch_size, method=cfg.score_method), timings)
    run_stage("select", select.main, select.CONFIG(
        run_dir=cfg.run_dir, data_budget=cfg.data_budget, param_budget=cfg.param_budget,
        joint_rounds=cfg.joint_rounds, device=cfg.device, overwrite=cfg.overwrite), timings)
    run_stage("train", train.main, stage_config(
        train.CONFIG, cfg, method=cfg.train_method, lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
        micro_batch_size=cfg.micro_batch_size), timings)
    run_stage("eval", evaluate.main, stage_config(
        evaluate.CONFIG, cfg, data_dir=str(files["test"].parent), batch_size=cfg.eval_batch_size,
        max_examples=cfg.eval_max_examples), timings)
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
    lines = [f"# dualsft run report: {run}\n",
             "## Base vs tuned\n", markdown_table(["metric", "base", "tuned (DualSFT)"], rows),
             "\nMeans ± standard deviation over examples, n examples. Exact match uses the task's own scorer on greedy "
             "generations.\n",
             "## What was selected\n", *selection_lines(sel, scores),
             "", "## Time per stage (s)\n", markdown_table(list(timings), [[str(v) for v in timings.values()]]),
             "## Plots\n"]
    lines += [f"![{p.stem}]({p.relative_to(run)})" for p in plots]
    path = run / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


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
    tasks = get(data, "overlap", "task") or {}
    if tasks:
        rows = [[t, str(v.get("pool")), str(v.get("selected")), f"{100 * (v.get('share_of_subset') or 0):.0f}%"]
                for t, v in sorted(tasks.items(), key=lambda kv: -kv[1].get("selected", 0))]
        lines += ["Subset composition by pool task:\n", markdown_table(["task", "in pool", "selected", "share of subset"],
                                                                       rows)]
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
