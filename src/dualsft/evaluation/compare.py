"""`dualsft compare`: the paper's comparison (docs/method.md §6) rerunnable by anyone, at matched budgets.

Protocol (issue 13), for one target task:
  1. data: val (the scoring target V, 256 by default), dev (64, for choosing the lr) and test (256) from one
     stratified draw of the target task (dualsft.data.build);
  2. per seed: the warm-up (its subset drawn with the seed) and DualSFT's scores (anchors drawn with the
     seed), shared by the DualSFT methods and the gradient baselines of that seed;
  3. every method's selection per seed;
  4. the lr per method: trained at each --lr-grid value on the first seed at the same budget, chosen by mean
     teacher-forced loss on dev.jsonl; then every other seed trains at the chosen lr;
  5. only then the test split is read: the base model and every (method, seed) are evaluated;
  6. cells: mean [95% bootstrap CI] over seeds × test items (evaluation.stats, from predictions.jsonl),
     paired differences dualsft − each method with a win/tie/loss verdict (a loss or KL: lower wins).
``--target-tasks a,b`` repeats this per task into RUN/<task>/ and writes RUN/summary.{json,md} (wins / ties /
losses of dualsft against each method across tasks).

Writes RUN/<out>/ (default RUN/compare/):
    results.json      per method: lr, dev loss per lr, per-seed metrics and composition, "ci", "vs_reference"
    results.md        the table with CIs, the paired differences, wins/ties/losses, subset compositions (seed 0)
    tradeoff.png      stability (forgetting) vs plasticity (target accuracy), error bars over seeds
    scores.png        distribution of φ_data (first seed) with the subsets of DualSFT, LESS and random marked
    scoring/seed<s>/{warmup,scores}/  the seed's warm-up and scores; scoring/seed<s>@<variant>/scores/
    base/eval/        the base model's test evaluation
    <method>/seed<s>/{selection,train[-lr<lr>],eval}/   every intermediate artifact, resumable
    <method>/seed<s>/selection_cost.json      the selection's cost record (written last: the resume mark)
The options are `dualsft run`'s (the stage sections) plus the methods, seeds, lr grid and tasks; on a run
folder `dualsft run` made, the settings it recorded are the defaults (its data is reused; dualsft.config). A method
is a data selector and a parameter selector of dualsft.baselines.registry ("dualsft" among them: the
seed's scores ranked as `dualsft select` ranks them); dualsft and dualsft-joint run the `dualsft select`
stage itself; ``dualsft@VARIANT`` (VARIANTS) scores with that variant's score section into its own folder:
paper = the paper's formula (= --preset release's score section), lessform = LESS's form (the defaults), and
one-change ablations of the paper's formula (e.g. noprior = the paper's with λ_prior 0, adam, adamstep, cosine,
normalized, linear, answer); every variant sets the whole formula, so it means the same whatever the defaults.
The plain dualsft methods score with the score section as given (defaults: LESS's form, docs/method.md §4).
Methods (``--methods``, comma separated):
    dualsft          DualSFT data + DualSFT mask, selected independently (the release's way)
    dualsft-joint    DualSFT with --select.joint-rounds (default 1) of true joint refinement (docs/method.md §7)
    dualsft-data     DualSFT subset, all parameters (single-axis)
    dualsft-param    all data, DualSFT mask (single-axis)
    less->sift       LESS-style subset, then a SIFT mask scored on that subset (sequential hybrid)
    sift->less       SIFT mask, then LESS-style data restricted to the masked entries
    random           random subset + random mask
    DATA+PARAM       any pair: DATA in random|less|loss|all|dualsft, PARAM in random|magnitude|sift|full|lora|dualsft;
                     each axis chosen independently (dualsft+random: DualSFT's subset under the random mask)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualsft.config import PAPER_SCORE, opt, section
from dualsft.data.build import DataBuildConfig
from dualsft.errors import ConfigError
from dualsft.io import read_json, read_jsonl, write_json
from dualsft.report import get, histogram_plot, markdown_table, scatter_plot
from dualsft.runs import portable_config, portable_path
from dualsft.scoring.score import ScoreConfig
from dualsft.selection.select import SelectConfig
from dualsft.stages import SELECT_WIRING, RunConfig, data_files, refuse_multiprocess, run_stage, stage_config

HELP = "compare DualSFT with matched-budget baselines and sequential hybrids over seeds (table + plots)"
log = logging.getLogger(__name__)

ALIASES: dict[str, tuple[str, str, str]] = {
    "dualsft": ("dualsft", "dualsft", "independent"),
    "dualsft-joint": ("dualsft", "dualsft", "joint"),
    "dualsft-data": ("dualsft", "full", "independent"),
    "dualsft-param": ("all", "dualsft", "independent"),
    "less->sift": ("less", "sift", "data_first"), "less→sift": ("less", "sift", "data_first"),
    "sift->less": ("less", "sift", "param_first"), "sift→less": ("less", "sift", "param_first"),
    "random": ("random", "random", "independent"),
}
DEFAULT_METHODS = "dualsft,dualsft-joint,dualsft-data,dualsft-param,less->sift,sift->less,random"


# Named DualSFT variants (``dualsft@NAME`` rows): overrides of the score section, applied to a resolved copy
# (dataclasses.replace); a field ScoreConfig does not have is refused. Each variant scores into its own folder.
# Each sets all four options of the scoring formula (precondition, data_params, data_score, target_gradient), so
# its meaning does not follow `dualsft score`'s defaults (LESS's form since issue 13; the paper's before): the
# one-change ablations are the paper's formula plus that change, as they were measured.
LESSFORM = {"precondition": "adam-step", "data_params": "linear", "data_score": "cosine",
            "target_gradient": "normalized"}
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": dict(PAPER_SCORE),  # the paper's formula (the defaults before issue 13; = --preset release's score)
    "noprior": {**PAPER_SCORE, "lambda_prior": 0.0},
    "answer": {**PAPER_SCORE, "score_tokens": "answer"},
    "cosine": {**PAPER_SCORE, "data_score": "cosine"},
    "normalized": {**PAPER_SCORE, "target_gradient": "normalized"},
    "adam": {**PAPER_SCORE, "precondition": "adam"},
    "adamstep": {**PAPER_SCORE, "precondition": "adam-step"},
    # every LESS ingredient that keeps φ_data linear in g_n: Adam-step scale, linear layers only, unit-normalised
    # target gradients, cosine ranking (docs/method.md §4); the defaults' values, kept explicit
    "lessform": dict(LESSFORM),
    # ablations of lessform: without the Adam-step scale; only the two normalisations (every parameter, no scale)
    "lessform-noadam": {**LESSFORM, "precondition": "none"},
    "cosnorm": {**PAPER_SCORE, "data_score": "cosine", "target_gradient": "normalized"},
    "linear": {**PAPER_SCORE, "data_params": "linear"},
}


@dataclass(frozen=True)
class CompareConfig(RunConfig):
    """Options of `dualsft compare` (all of `dualsft run`'s, plus the methods, seeds, lr grid and tasks).

    The data section's defaults are the measured study's: val 256 (the scoring target V), test 256, dev 64,
    on products (chain_sum has only 200 distinct questions)."""

    data: DataBuildConfig = section(DataBuildConfig, "the embedded data (`dualsft data build`; unused with "
                                    "--data-dir)", wired=("out",), pool_size=384, stability_size=8, humaneval_size=8,
                                    val_size=256, test_size=256, dev_size=64, target_task="products")
    methods: str = opt(DEFAULT_METHODS, "comma list of methods (see `dualsft compare` module docs / README); "
                                        f"dualsft@VARIANT for a variant in {sorted(VARIANTS)} (paper: the paper's "
                                        "scoring formula; lessform: the defaults)")
    seeds: str = opt("0,1,2", "comma list of seeds (warm-up subset, anchors, selection randomness, data order, LoRA init)")
    lr_grid: str = opt("1e-4,2e-4,5e-4", "comma list of learning rates tried per method on the first seed, chosen by "
                                         "mean dev loss (dev.jsonl); empty = every method trains at --train.lr")
    target_tasks: str = opt("", "comma list of target tasks, one sub-run RUN/<task>/ each; empty = --data.target-task")
    out: str = opt("compare", "output folder, relative to --run-dir (of each task's sub-run)")
    less_dim: int = opt(8192, "projection dimension of the LESS-style baseline")
    select: SelectConfig = section(SelectConfig, "selection (`dualsft select`) of the DualSFT methods; joint_rounds "
                                   "is dualsft-joint's (the others select independently)", **SELECT_WIRING,
                                   local=("joint_rounds",), joint_rounds=1)


CONFIG = CompareConfig


def split_method(name: str) -> tuple[str, str]:
    """"dualsft@noprior" -> ("dualsft", "noprior"); a name without @ has variant ""."""
    base, _, variant = name.partition("@")
    if variant and variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r} in {name!r}: use one of {sorted(VARIANTS)}")
    return base, variant


def parse_method(name: str) -> tuple[str, str, str]:
    """Method name -> (data method, param method, order); a @variant changes only the DualSFT scores."""
    base, variant = split_method(name)
    if variant:
        data, param, order = parse_method(base)
        if "dualsft" not in (data, param):
            raise ConfigError(f"{name!r}: a @variant changes DualSFT's scores, but {base!r} uses none")
        return data, param, order
    if name in ALIASES:
        return ALIASES[name]
    if "+" in name:
        from dualsft.baselines.registry import DATA_SELECTORS, PARAM_SELECTORS

        data, param = name.split("+", 1)
        data_ok, param_ok = sorted(DATA_SELECTORS), sorted(PARAM_SELECTORS)
        if data not in data_ok or param not in param_ok:
            raise ConfigError(f"unknown method {name!r}: DATA+PARAM takes DATA in {data_ok} and PARAM in {param_ok}")
        return data, param, "independent"
    raise ConfigError(f"unknown method {name!r}: use one of {sorted(ALIASES)} or DATA+PARAM")


def variant_score(score: ScoreConfig, variant: str) -> ScoreConfig:
    """The score section with a variant's overrides (a resolved copy; the user's config is not changed)."""
    overrides = VARIANTS.get(variant, {}) if variant else {}
    known = {f.name for f in dataclasses.fields(score)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"variant {variant!r} sets {unknown}, which this version's score section lacks "
                          f"(it has {sorted(known)}); drop the variant or update dualsft")
    return dataclasses.replace(score, **overrides)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(f"--seeds must be a comma list of integers, got {text!r}") from e
    if not seeds:
        raise ConfigError("--seeds is empty")
    return seeds


def parse_lr_grid(text: str) -> list[float]:
    """[] for an empty grid (train at --train.lr), else the positive learning rates."""
    try:
        grid = [float(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(f"--lr-grid must be a comma list of numbers, got {text!r}") from e
    if any(lr <= 0 for lr in grid):
        raise ConfigError(f"--lr-grid values must be positive, got {text!r}")
    return grid


def mean_std(values: list[float]) -> dict[str, float | int]:
    """{"mean", "std" (sample std over seeds, 0 for one seed), "n" (seeds)}."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


# ---------------------------------------------------------------------------------------------------
# orchestration


def main(cfg: CompareConfig) -> int:
    refuse_multiprocess("compare")
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    plan = {m: parse_method(m) for m in methods}
    for m in methods:  # refuse an unusable variant before any work
        variant_score(cfg.score, split_method(m)[1])
    seeds, grid = parse_seeds(cfg.seeds), parse_lr_grid(cfg.lr_grid)
    tasks = [t.strip() for t in cfg.target_tasks.split(",") if t.strip()]
    if cfg.pool or cfg.target or cfg.test:
        raise ConfigError("`dualsft compare` reads its splits from --data-dir (pool.jsonl, val.jsonl, dev.jsonl, "
                          "test.jsonl) or builds them; --pool / --target / --test are options of `dualsft run`")
    if tasks and cfg.data_dir:
        raise ConfigError("--target-tasks builds one data set per task; it cannot be used with --data-dir")
    if not tasks:
        compare_task(cfg, plan, seeds, grid)
        print(f"\ncomparison table: {Path(cfg.run_dir) / cfg.out / 'results.md'}")
        return 0
    per_task = {}
    for task in tasks:
        tcfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir) / task),
                                   data=dataclasses.replace(cfg.data, target_task=task))
        per_task[task] = compare_task(tcfg, plan, seeds, grid)
    write_task_summary(Path(cfg.run_dir), per_task)
    print(f"\nsummary across tasks: {Path(cfg.run_dir) / 'summary.md'}")
    return 0


def compare_task(cfg: CompareConfig, plan: dict[str, tuple[str, str, str]], seeds: list[int],
                 grid: list[float]) -> dict[str, Any]:
    """One target task: data, per-seed scoring, every selection, the lr grid on dev, every training, and
    only then the test evaluations (base included). Returns the results written to results.json."""
    from dualsft.data import build

    out = Path(cfg.run_dir) / cfg.out
    files = data_files(cfg)
    timings: dict[str, float] = {}
    if not cfg.data_dir:
        run_stage("data build", build.main, stage_config(cfg.data, seed=0), timings)
    variants = sorted({split_method(m)[1] for m, (d, p, _) in plan.items() if "dualsft" in (d, p)})
    scoring = {seed: score_seed(cfg, out, seed, variants, files) for seed in seeds}
    ctx_cache: dict[Any, Any] = {}
    selected: dict[tuple[str, int], tuple[Path, dict, float]] = {}
    for seed in seeds:  # seed-major, so the baseline context (θw of that seed) is built once per seed
        for name, (data_m, param_m, order) in plan.items():
            d = out / safe_name(name) / f"seed{seed}"
            t0 = time.time()
            sel, cost = select_for(cfg, data_m, param_m, order, seed, d, files, ctx_cache,
                                   scoring[seed][split_method(name)[1]])
            selected[name, seed] = (sel, cost, time.time() - t0)
    ctx_cache.clear()
    chosen, dev = choose_lrs(cfg, plan, seeds[0], grid, out, selected, files)
    trained = {(name, seed): train_for(cfg, selected[name, seed][0], plan[name][1], seed,
                                       out / safe_name(name) / f"seed{seed}", chosen[name], bool(grid))
               for name in plan for seed in seeds}
    # the test split is read from here on only: every training (grid and seeds) is done
    base_metrics, base_dir = evaluate_base(cfg, out, files)
    results: dict[str, Any] = {}
    for name, (data_m, param_m, order) in plan.items():
        per_seed = []
        for seed in seeds:
            d = out / safe_name(name) / f"seed{seed}"
            train_dir, train_info = trained[name, seed]
            metrics = evaluate_for(cfg, train_dir, d, files)
            sel, cost, wall = selected[name, seed]
            per_seed.append({"seed": seed, "metrics": metrics, "selection_cost": cost, "selection_wall_s": wall,
                             "train": train_info, "composition": composition_of(sel, files["pool"])})
        results[name] = {"data": data_m, "param": param_m, "order": order, "variant": split_method(name)[1] or None,
                         "lr": chosen[name], "dev_loss": dev.get(name, {}), "seeds": per_seed,
                         "summary": summarise_method(per_seed)}
    scores = add_intervals(results, out, seeds, base_dir)
    task = cfg.data.target_task if not cfg.data_dir else None
    doc = {"base": base_metrics, "methods": results, "reference": reference_method(results),
           "target_check": target_check(task, results, scores, out) if task else {},
           "config": portable_config(dataclasses.asdict(cfg))}
    write_json(out / "results.json", doc)
    write_outputs(cfg, out, base_metrics, results, scoring[seeds[0]].get("", None), doc["target_check"])
    return doc


def safe_name(name: str) -> str:
    return name.replace("→", "-to-").replace("->", "-to-").replace("+", "_plus_")


def score_seed(cfg: CompareConfig, out: Path, seed: int, variants: list[str], files: dict[str, Path]) -> dict[str, Path]:
    """The seed's warm-up (subset drawn with ``seed``) and its DualSFT scores (anchors drawn with ``seed``),
    shared by every method of that seed; one scores folder per variant. Returns {variant: folder holding
    warmup/ and scores/} ("" = the paper's defaults).

    Layout: OUT/scoring/seed<s>/{warmup,scores}/; a variant OUT/scoring/seed<s>@<v>/scores/ with warmup/ a
    link to the seed's (the score stage writes RUN/scores of its run folder)."""
    from dualsft.scoring import score, warmup

    pool, val = str(files["pool"]), str(files["val"])
    root = out / "scoring" / f"seed{seed}"
    run_stage(f"warmup seed {seed}", warmup.main, stage_config(cfg.warmup, pool=pool, seed=seed, run_dir=str(root)), {})
    dirs = {"": root}
    for v in variants:
        d = root if not v else root.with_name(f"seed{seed}@{v}")
        if v:
            d.mkdir(parents=True, exist_ok=True)
            if not (d / "warmup").exists():  # a relative link, so the run folder can move
                (d / "warmup").symlink_to(Path("..") / root.name / "warmup", target_is_directory=True)
        run_stage(f"score seed {seed}{'@' + v if v else ''}", score.main,
                  stage_config(variant_score(cfg.score, v), pool=pool, target=val, seed=seed, run_dir=str(d)), {})
        dirs[v] = d
    return dirs


def evaluate_base(cfg: CompareConfig, out: Path, files: dict[str, Path]) -> tuple[dict, Path]:
    from dualsft.evaluation import evaluate

    d = out / "base" / "eval"
    if not (d / "metrics.json").exists():
        evaluate.main(stage_config(cfg.eval, data_dir=str(files["test"].parent), train_dir="none", out=str(d)))
    return read_json(d / "metrics.json")["models"]["model"], d


def scoring_cost(sdir: Path) -> dict[str, Any]:
    """DualSFT's selection cost from SDIR/scores/summary.json: wall time and passes of the scoring run."""
    s = read_json(sdir / "scores" / "summary.json")
    timings = s.get("timings", {})
    wall = sum(t.get("wall_time_s", 0.0) for t in timings.values())
    return {"wall_s": wall, "passes": list(timings), "examples_processed": sum(t.get("examples", 0) for t in
                                                                                timings.values())}


def select_for(cfg: CompareConfig, data_m: str, param_m: str, order: str, seed: int, d: Path,
               files: dict[str, Path], ctx_cache: dict[Any, Any], sdir: Path | None) -> tuple[Path, dict]:
    """Write the method's selection into d/selection and its cost into d/selection_cost.json (resuming a
    finished one); returns (folder, cost). ``sdir``: the seed's (variant's) scoring folder."""
    sel, cost_file = d / "selection", d / "selection_cost.json"
    if cost_file.exists() and (sel / "subset.jsonl").exists():
        return sel, read_json(cost_file)
    if (data_m, param_m) == ("dualsft", "dualsft"):
        cost = select_dualsft(cfg, order, sel, sdir)
    else:
        cost = select_baseline_for(cfg, data_m, param_m, order, seed, sel, files, ctx_cache, sdir)
    write_json(cost_file, cost)
    return sel, cost


def select_dualsft(cfg: CompareConfig, order: str, sel: Path, sdir: Path) -> dict:
    """DualSFT on both axes through the real `dualsft select` stage (with joint refinement for dualsft-joint)."""
    from dualsft.selection import select

    rounds = cfg.select.joint_rounds if order == "joint" else 0
    t0 = time.time()
    # --out is relative to --run-dir (the scoring folder): a relative path, so no absolute folder is recorded
    select.main(stage_config(cfg.select, run_dir=str(sdir), out=os.path.relpath(sel, sdir), joint_rounds=rounds,
                             overwrite=True, plot=False))
    cost = scoring_cost(sdir)
    cost["wall_s"] += time.time() - t0
    cost["note"] = "this seed's DualSFT scoring passes + this selection" + (
        f" with {rounds} joint round(s)" if rounds else "")
    surrogate = read_json(sel / "summary.json").get("surrogate") or {}
    cost["examples_processed"] += sum(surrogate.get("passes", {}).values())
    return cost


def baseline_context(cfg: CompareConfig, files: dict[str, Path], seed: int, cache: dict[Any, Any],
                     sdir: Path) -> Any:
    """The BaselineContext (θw of this seed's warm-up, θ0, pool/target batches, c), built once per seed."""
    from dualsft.baselines.less import LessConfig
    from dualsft.baselines.registry import DualSFTScores, make_context
    from dualsft.data.formats import batches, load_examples, tokenize_examples
    from dualsft.io import load_tensors
    from dualsft.models import load_model, load_tokenizer
    from dualsft.selection.select import mask_spec

    if cache.get("seed") != seed:
        cache.clear()  # one seed's models at a time
        tok = load_tokenizer(cfg.model)
        warm = sdir / "warmup" / "model"
        model = load_model(str(warm) if warm.exists() else cfg.model, cfg.dtype, cfg.device)
        base = load_model(cfg.model, cfg.dtype, cfg.device)
        curv = sdir / "warmup" / "exp_avg_sq.safetensors"
        pool_ex = load_examples(files["pool"])
        pool_t = tokenize_examples(pool_ex, tok, cfg.template, cfg.max_length, cfg.drop_empty, "pool",
                                   assistant_turns=cfg.assistant_turns)
        val_t = tokenize_examples(load_examples(files["val"]), tok, cfg.template, cfg.max_length, cfg.drop_empty, "val",
                                  assistant_turns=cfg.assistant_turns)
        cache.update(seed=seed, model=model, pool_batches=batches(pool_t, cfg.score.batch_size, tok.pad_token_id),
                     target_batches=batches(val_t, cfg.score.batch_size, tok.pad_token_id), base_model=base,
                     curvature=load_tensors(curv) if curv.exists() else None, pool=pool_ex)
    c = cache
    scores = DualSFTScores(sdir / "scores", mask_spec(cfg.select))
    return make_context(c["model"], c["pool_batches"], cfg.select.data_budget, cfg.select.param_budget,
                        target_batches=c["target_batches"], base_model=c["base_model"], curvature=c["curvature"],
                        seed=seed, less=LessConfig(dim=cfg.less_dim), progress=True, dualsft=scores), c["pool"]


def select_baseline_for(cfg: CompareConfig, data_m: str, param_m: str, order: str, seed: int, sel: Path,
                        files: dict[str, Path], cache: dict[Any, Any], sdir: Path) -> dict:
    """Any other pair through the registry; a DualSFT axis adds the seed's scoring passes to the cost."""
    from dualsft.baselines.registry import select_baseline
    from dualsft.baselines.writer import write_selection

    ctx, pool = baseline_context(cfg, files, seed, cache, sdir)
    selection = select_baseline(data_m, param_m, ctx, order)  # type: ignore[arg-type]
    write_selection(sel, selection, pool)
    cost = dict(selection.cost)
    if "dualsft" in (data_m, param_m):
        shared = scoring_cost(sdir)
        cost.update(wall_s=cost["wall_s"] + shared["wall_s"],
                    examples_processed=cost["examples_processed"] + shared["examples_processed"],
                    note="this seed's DualSFT scoring passes + this selection", shared_scoring=shared)
    return cost


def choose_lrs(cfg: CompareConfig, plan: dict[str, tuple[str, str, str]], seed: int, grid: list[float], out: Path,
               selected: dict, files: dict[str, Path]) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    """Per method, the lr of ``grid`` with the lowest mean dev loss after training on ``seed``'s selection
    at the same budget (teacher-forced loss on dev.jsonl only; the test split is not read). An empty grid
    gives every method --train.lr (LoRA its own default). Returns ({method: lr}, {method: {lr: dev loss}})."""
    if not grid:
        return {n: (None if p == "lora" else cfg.train.lr) for n, (_, p, _) in plan.items()}, {}
    dev_file = files["val"].parent / "dev.jsonl"
    if len(grid) > 1 and not dev_file.exists():
        raise ConfigError(f"--lr-grid {cfg.lr_grid!r} chooses the lr on {dev_file}, which is missing: build the data "
                          "with --data.dev-size > 0 (or add dev.jsonl to --data-dir), or pass one lr")
    chosen, dev = {}, {}
    for name, (_, param_m, _) in plan.items():
        d = out / safe_name(name) / f"seed{seed}"
        losses = {}
        for lr in grid:
            train_dir, _ = train_for(cfg, selected[name, seed][0], param_m, seed, d, lr, True)
            losses[f"{lr:g}"] = dev_loss(cfg, train_dir, dev_file) if len(grid) > 1 else float("nan")
        chosen[name] = min(grid, key=lambda lr: losses[f"{lr:g}"]) if len(grid) > 1 else grid[0]
        dev[name] = losses
        log.info("%s: dev loss per lr %s -> lr %g", name, losses, chosen[name])
    return chosen, dev


def dev_loss(cfg: CompareConfig, train_dir: Path, dev_file: Path) -> float:
    """Mean teacher-forced response loss of the tuned model on dev.jsonl (cached in TRAIN_DIR/dev_loss.json)."""
    from dualsft.data.formats import load_examples
    from dualsft.evaluation.evaluate import load_tuned, losses_and_kl
    from dualsft.models import load_tokenizer

    cache = train_dir / "dev_loss.json"
    if cache.exists():
        return float(read_json(cache)["mean"])
    model = load_tuned(cfg.eval, train_dir)
    model.eval()
    loss, _ = losses_and_kl(model, load_tokenizer(cfg.model), load_examples(dev_file), cfg.eval, None, desc="dev loss")
    value = statistics.fmean(loss.values())
    write_json(cache, {"mean": value, "n": len(loss)})
    return value


def train_for(cfg: CompareConfig, sel: Path, param_m: str, seed: int, d: Path, lr: float | None,
              per_lr: bool) -> tuple[Path, dict]:
    """Train on the selection at ``lr`` into d/train (d/train-lr<lr> with an lr grid; resuming a finished one)."""
    from dualsft.training import train

    out = d / (f"train-lr{lr:g}" if per_lr and lr is not None else "train")
    mask = sel / "mask.safetensors"
    method, extra = cfg.train.method, {"lr": lr}
    if param_m == "lora":
        info = read_json(sel / "summary.json").get("info", {})
        r = int(info.get("lora_rank", 16))
        method, extra = "lora", {"lora_r": r, "lora_alpha": 2 * r, "lr": lr}
    elif not mask.exists():
        method = "full"
    if not (out / "delta.safetensors").exists() and not (out / "adapter" / "adapter_config.json").exists():
        options = dict(train_file=str(sel / "subset.jsonl"), mask=str(mask) if mask.exists() else "none",
                       method=method, out=str(out), seed=seed, overwrite=True)
        run_stage(f"train {d.parent.name}/{d.name}/{out.name}", train.main,
                  stage_config(cfg.train, **{**options, **extra}), {})
    info = read_json(out / "adapter.json") if (out / "adapter.json").exists() else {}
    metrics = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    return out, {"method": method, "lr": lr, "trainable": get(info, "result", "trainable_entries"),
                 "wall_s": metrics[-1].get("time") if metrics else None, "steps": len(metrics)}


def evaluate_for(cfg: CompareConfig, train_dir: Path, d: Path, files: dict[str, Path]) -> dict:
    from dualsft.evaluation import evaluate

    out = d / "eval"
    if not (out / "metrics.json").exists():
        run_stage(f"eval {d.parent.name}/{d.name}", evaluate.main, stage_config(
            cfg.eval, data_dir=str(files["test"].parent), train_dir=str(train_dir), out=str(out), eval_base=False,
            overwrite=True), {})
    return read_json(out / "metrics.json")["models"]["tuned"]


def composition_of(sel: Path, pool_file: Path) -> dict[str, Any]:
    """The subset's composition by task and answer type beside the pool's (selection/report.subset_overlap)."""
    from dualsft.selection.report import subset_overlap

    return subset_overlap(read_jsonl(pool_file), read_jsonl(sel / "subset.jsonl"))


def reference_method(results: dict[str, Any]) -> str:
    """The method the paired differences are taken against: "dualsft" if run, else the first method."""
    return "dualsft" if "dualsft" in results else next(iter(results))


def add_intervals(results: dict[str, Any], out: Path, seeds: list[int], base_dir: Path) -> dict[str, Any]:
    """Per method: "ci" (mean ± 95% bootstrap CI over seeds × test items per metric) and, for every other
    method, "vs_reference" (reference − method, paired on seeds and items, with its verdict). Returns the
    per-item scores read from the predictions: {method: {column: [per seed {item: score}]}}."""
    from dualsft.evaluation.cells import item_scores, method_cells, paired_cells

    scores = {}
    for name in results:
        runs = [item_scores(out / safe_name(name) / f"seed{s}" / "eval" / "predictions.jsonl", "tuned") for s in seeds]
        scores[name] = {col: [r.get(col, {}) for r in runs] for col in {c for r in runs for c in r}}
        results[name]["ci"] = method_cells(scores[name])
    ref = reference_method(results)
    for name in results:
        if name != ref:
            results[name]["vs_reference"] = {"reference": ref, **paired_cells(scores[ref], scores[name])}
    return scores


def target_check(task: str, results: dict[str, Any], scores: dict[str, Any], out: Path) -> dict[str, dict[str, Any]]:
    """Issue 13's criterion per method: does the subset find the target task (its share of the subset at least
    twice the pool's, on every seed) and does training help it (target loss − the base model's, paired on
    seeds × test items, 95% CI wholly below 0)? ``scores``: what ``add_intervals`` returned."""
    from dualsft.evaluation.cells import common_items, item_scores, score_matrix
    from dualsft.evaluation.stats import paired_difference

    base = item_scores(out / "base" / "eval" / "predictions.jsonl", "model").get("target loss", {})
    checks = {}
    for name, r in results.items():
        shares = [get(s, "composition", "task", task, "share_of_subset") or 0.0 for s in r["seeds"]]
        pool = get(r["seeds"][0], "composition", "task", task, "share_of_pool")
        runs = scores[name].get("target loss") or [{} for _ in r["seeds"]]
        items = common_items([base], runs)
        diff = (paired_difference(score_matrix(runs, items), score_matrix([base] * len(runs), items)).as_dict()
                if items else None)
        checks[name] = {"target_share": shares, "pool_share": pool,
                        "share_2x_pool": pool is not None and all(x >= 2 * pool for x in shares),
                        "target_loss_minus_base": diff, "loss_below_base": bool(diff and diff["high"] < 0)}
    return checks


def target_check_markdown(task: str, checks: dict[str, dict[str, Any]]) -> list[str]:
    """The section of results.md for ``target_check``."""
    from dualsft.evaluation.cells import fmt_interval

    if not checks:
        return []
    rows = [[name, " / ".join(f"{x:.0%}" for x in c["target_share"]),
             "—" if c["pool_share"] is None else f"{c['pool_share']:.0%}", "yes" if c["share_2x_pool"] else "no",
             fmt_interval(c["target_loss_minus_base"], signed=True), "yes" if c["loss_below_base"] else "no"]
            for name, c in checks.items()]
    return [f"\n## Does the subset find {task}, and does training on it help? (issue 13's criterion)\n",
            markdown_table(["method", "target share of the subset (per seed)", "pool share", "≥ 2× pool on every seed",
                            "target loss − base [95% CI]", "below base (CI < 0)"], rows)]


# ---------------------------------------------------------------------------------------------------
# aggregation and outputs

METRICS = {  # column -> path in an eval metrics tree (means over examples)
    "target acc": ("target", "accuracy", "mean"),
    "target loss": ("target", "loss", "mean"),
    "stability acc": ("stability", "all", "accuracy", "mean"),
    "stability loss": ("stability", "all", "loss", "mean"),
    "general loss": ("general", "all", "loss", "mean"),
    "general KL": ("general", "all", "kl", "mean"),
}


def summarise_method(per_seed: list[dict]) -> dict[str, Any]:
    """mean ± std over seeds of each metric and cost."""
    out = {col: mean_std([get(s["metrics"], *path) for s in per_seed]) for col, path in METRICS.items()}
    out["selection s"] = mean_std([s["selection_cost"].get("wall_s") for s in per_seed])
    out["selection examples"] = mean_std([s["selection_cost"].get("examples_processed") for s in per_seed])
    out["train s"] = mean_std([s["train"].get("wall_s") for s in per_seed])
    out["trainable"] = per_seed[0]["train"].get("trainable")
    out["b"] = None
    return out


def write_outputs(cfg: CompareConfig, out: Path, base: dict, results: dict[str, Any], sdir: Path | None,
                  checks: dict[str, dict[str, Any]]) -> None:
    """results.md (cells with CIs, paired differences, wins/ties/losses, the target check, compositions),
    tradeoff.png, scores.png."""
    (out / "results.md").write_text(results_markdown(cfg, out, base, results, checks))
    points = {name: (r["summary"]["stability loss"]["mean"], r["summary"]["stability loss"]["std"],
                     100 * r["summary"]["target acc"]["mean"], 100 * r["summary"]["target acc"]["std"])
              for name, r in results.items()}
    base_x, base_y = get(base, *METRICS["stability loss"]), get(base, *METRICS["target acc"])
    points["base"] = (float("nan") if base_x is None else base_x, 0.0,
                      float("nan") if base_y is None else 100 * base_y, 0.0)  # 0% accuracy is a real point
    scatter_plot(out / "tradeoff.png", points, "stability loss on held-out tasks (lower = less forgetting)",
                 "target accuracy % (higher = more plasticity)", "stability vs plasticity at matched budgets")
    plot_score_distributions(sdir, out, results)


CI_COLS = ("target acc", "target loss", "stability loss", "general KL", "HumanEval pass@1")
PCT = {"target acc", "HumanEval pass@1"}


def results_markdown(cfg: CompareConfig, out: Path, base: dict, results: dict[str, Any],
                     checks: dict[str, dict[str, Any]]) -> str:
    from dualsft.evaluation.cells import fmt_interval, item_scores, method_cells
    from dualsft.evaluation.stats import tally
    from dualsft.selection.report import composition_table

    shown = [c for c in CI_COLS if c != "HumanEval pass@1" or any(c in r.get("ci", {}) for r in results.values())]
    base_ci = method_cells({c: [v] for c, v in item_scores(out / "base" / "eval" / "predictions.jsonl",
                                                            "model").items()})
    header = (["method", "lr"] + [c + (" %" if c in PCT else "") for c in shown]
              + ["selection s", "selection examples", "train s", "trainable"])
    rows = [["base (no tuning)", "—"] + [fmt_interval(base_ci.get(c), c in PCT) for c in shown] + ["—"] * 4]
    for name, r in results.items():
        s = r["summary"]
        rows.append([name, "—" if r.get("lr") is None else f"{r['lr']:g}"]
                    + [fmt_interval(r.get("ci", {}).get(c), c in PCT) for c in shown]
                    + [f"{s['selection s']['mean']:.0f}", count_cell(s.get("selection examples", {})),
                       f"{s['train s']['mean']:.0f}" if s["train s"]["n"] else "—",
                       f"{s['trainable']:,}" if isinstance(s.get("trainable"), int) else "—"])
    seeds = parse_seeds(cfg.seeds)
    sizes = ", ".join(f"{c.split()[0]} n={get(base, *METRICS[c][:-1], 'n')}" for c in ("target loss", "stability loss",
                                                                                       "general loss"))
    grid = f"lr per method chosen by mean dev loss over {cfg.lr_grid} on seed {seeds[0]}" if cfg.lr_grid.strip() \
        else "every method at --train.lr (no lr grid)"
    lines = [f"Target task {cfg.data.target_task if not cfg.data_dir else portable_path(cfg.data_dir)}. Budgets: data "
             f"{cfg.select.data_budget}, params {cfg.select.param_budget}; seeds {seeds}; {grid}. Cells: mean "
             f"[95% bootstrap CI] over seeds × test items (crossed bootstrap, evaluation.stats); examples per seed: "
             f"{sizes}. selection examples = examples pushed through a model while selecting (DualSFT: its seed's "
             "scoring passes; every gradient-based method also reuses that seed's warm-up).\n",
             markdown_table(header, rows)]
    ref = reference_method(results)
    diff_rows, verdicts = [], {c: [] for c in shown}
    for name, r in results.items():
        vs = r.get("vs_reference")
        if not vs:
            continue
        row = [name]
        for c in shown:
            cell = vs.get(c)
            row += [fmt_interval(cell["diff"], c in PCT, signed=True), cell["verdict"]] if cell else ["—", "—"]
            if cell:
                verdicts[c].append(cell["verdict"])
        diff_rows.append(row)
    if diff_rows:
        lines += [f"\n## Paired differences: {ref} − method (95% CI); verdict for {ref} (a loss or KL: lower wins)\n",
                  markdown_table(["method"] + [x for c in shown for x in (c + (" pp" if c in PCT else ""), "verdict")],
                                 diff_rows),
                  "\n" + "; ".join(f"{c}: {ref} {t['win']} wins / {t['tie']} ties / {t['loss']} losses"
                                   for c in shown if verdicts[c] for t in [tally(verdicts[c])])]
    lines += target_check_markdown(cfg.data.target_task, checks)
    lines.append(f"\n## Subset composition (seed {seeds[0]})\n")
    for name, r in results.items():
        comp = r["seeds"][0].get("composition") or {}
        table = composition_table(comp, "task") + [""] + composition_table(comp, "answer_type")
        if comp:
            lines += [f"### {name}\n", *table, ""]
    return "\n".join(lines) + "\n"


def write_task_summary(run: Path, per_task: dict[str, dict[str, Any]]) -> None:
    """RUN/summary.{json,md}: per baseline, the reference's wins/ties/losses across target tasks."""
    from dualsft.evaluation.stats import tally

    counts: dict[str, dict[str, list[str]]] = {}
    for doc in per_task.values():
        for name, r in doc["methods"].items():
            for c in CI_COLS:
                v = get(r, "vs_reference", c, "verdict")
                if v:
                    counts.setdefault(name, {}).setdefault(c, []).append(v)
    summary = {name: {c: tally(v) for c, v in cols.items()} for name, cols in counts.items()}
    ref = next((doc["reference"] for doc in per_task.values()), "dualsft")
    checks = {task: doc.get("target_check", {}) for task, doc in per_task.items()}
    write_json(run / "summary.json", {"tasks": list(per_task), "reference": ref, "wins_ties_losses": summary,
                                      "target_check": checks})
    cols = [c for c in CI_COLS if any(c in v for v in summary.values())]
    rows = [[name] + [f"{t[c]['win']} / {t[c]['tie']} / {t[c]['loss']}" if c in t else "—" for c in cols]
            for name, t in summary.items()]
    text = (f"Tasks: {', '.join(per_task)}. {ref} against each method: wins / ties / losses across tasks, judged by "
            f"the 95% CI of the paired difference (tables: RUN/<task>/compare/results.md).\n\n"
            + markdown_table(["method"] + cols, rows) + "\n" + "\n".join(task_check_lines(checks)))
    (run / "summary.md").write_text(text)


def task_check_lines(checks: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """summary.md's table of issue 13's criterion: per method and task, the subset's mean target share (≥ 2× the
    pool's on every seed?) and target loss − base (CI below 0?)."""
    from dualsft.evaluation.cells import fmt_interval

    tasks = [t for t, c in checks.items() if c]
    methods = list(dict.fromkeys(m for t in tasks for m in checks[t]))
    if not tasks:
        return []
    rows = []
    for m in methods:
        row, passed = [m], 0
        for t in tasks:
            c = checks[t].get(m)
            if not c:
                row.append("—")
                continue
            ok = c["share_2x_pool"] and c["loss_below_base"]
            passed += ok
            share = sum(c["target_share"]) / max(len(c["target_share"]), 1)
            row.append(f"{share:.0%} ({'≥' if c['share_2x_pool'] else '<'} 2×); "
                       f"{fmt_interval(c['target_loss_minus_base'], signed=True)} {'✓' if ok else '✗'}")
        rows.append(row + [f"{passed} of {len(tasks)}"])
    return ["\nIssue 13's criterion per task: mean target share of the subset over seeds (≥ 2× the pool's on every "
            "seed?); target loss − base [95% CI]; ✓ = both hold (share ≥ 2× pool on every seed and the loss CI "
            "below 0).\n", markdown_table(["method"] + tasks + ["tasks passed"], rows)]


def count_cell(stat: dict) -> str:
    """Mean count over seeds, with thousands separators; — when unrecorded."""
    return f"{stat['mean']:,.0f}" if stat.get("n") else "—"


def plot_score_distributions(sdir: Path | None, out: Path, results: dict[str, Any]) -> None:
    """φ_data of the whole pool (first seed's scores), and of the examples each data selector picked."""
    scores_path = sdir / "scores" / "data_scores.jsonl" if sdir is not None else None
    if scores_path is None or not scores_path.exists():
        return
    phi = {r["index"]: r["score"] for r in read_jsonl(scores_path)}
    series = {"pool": list(phi.values())}
    for name, r in results.items():
        if r["data"] in ("all",):
            continue
        sel = out / safe_name(name) / f"seed{r['seeds'][0]['seed']}" / "selection" / "subset.jsonl"
        if sel.exists():
            series[name] = [phi[x["index"]] for x in read_jsonl(sel) if x["index"] in phi]
    histogram_plot(out / "scores.png", series, "φ_data (DualSFT data score)", "which examples each method chose")
