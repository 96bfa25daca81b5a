"""`dualsft compare`: the paper's comparison (docs/method.md §6) rerunnable by anyone, at matched budgets.

For one model / data / budget setting it runs, for every method and seed: selection -> restricted
training -> evaluation, and writes RUN/<out>/ (default RUN/compare/):
    results.json      per method: per-seed metrics, mean ± std over seeds, scoring and training cost
    results.md        the markdown table
    tradeoff.png      stability (forgetting) vs plasticity (target accuracy), error bars over seeds
    scores.png        distribution of φ_data with the subsets of DualSFT, LESS and random marked
    <method>/seed<s>/{selection,train,eval}/   every intermediate artifact, resumable
    <method>/seed<s>/selection_cost.json      the selection's cost record (written last: the resume mark)
The options are `dualsft run`'s (the stage sections) plus the methods and seeds. The warm-up and the
DualSFT scores are computed once (shared; their cost is reported once per method that uses them). A
method is a data selector and a parameter selector of dualsft.baselines.registry ("dualsft" among them:
RUN/scores ranked as `dualsft select` ranks them); dualsft and dualsft-joint run the `dualsft select`
stage itself. Methods (``--methods``, comma separated):
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
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualsft.config import opt, section
from dualsft.errors import ConfigError
from dualsft.io import read_json, read_jsonl, write_json
from dualsft.report import get, histogram_plot, markdown_table, scatter_plot
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


@dataclass(frozen=True)
class CompareConfig(RunConfig):
    """Options of `dualsft compare` (all of `dualsft run`'s, plus the methods and seeds)."""

    methods: str = opt(DEFAULT_METHODS, "comma list of methods (see `dualsft compare` module docs / README)")
    seeds: str = opt("0", "comma list of seeds (selection randomness, data order, LoRA init)")
    out: str = opt("compare", "output folder, relative to --run-dir")
    less_dim: int = opt(8192, "projection dimension of the LESS-style baseline")
    select: SelectConfig = section(SelectConfig, "selection (`dualsft select`) of the DualSFT methods; joint_rounds "
                                   "is dualsft-joint's (the others select independently)", **SELECT_WIRING,
                                   joint_rounds=1)


CONFIG = CompareConfig


def parse_method(name: str) -> tuple[str, str, str]:
    """Method name -> (data method, param method, order)."""
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


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(f"--seeds must be a comma list of integers, got {text!r}") from e
    if not seeds:
        raise ConfigError("--seeds is empty")
    return seeds


def mean_std(values: list[float]) -> dict[str, float | int]:
    """{"mean", "std" (sample std over seeds, 0 for one seed), "n" (seeds)}."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


# ---------------------------------------------------------------------------------------------------
# orchestration


def main(cfg: CompareConfig) -> int:
    from dualsft.data import build
    from dualsft.scoring import score, warmup

    refuse_multiprocess("compare")
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    plan = {m: parse_method(m) for m in methods}
    seeds = parse_seeds(cfg.seeds)
    out = Path(cfg.run_dir) / cfg.out
    files = data_files(cfg)
    timings: dict[str, float] = {}
    if not cfg.data_dir:
        run_stage("data build", build.main, stage_config(cfg.data, seed=0), timings)
    pool, val = str(files["pool"]), str(files["val"])
    run_stage("warmup", warmup.main, stage_config(cfg.warmup, pool=pool, seed=0), timings)
    needs_scores = any("dualsft" in (d, p) for d, p, _ in plan.values())
    if needs_scores:
        run_stage("score", score.main, stage_config(cfg.score, pool=pool, target=val, seed=0), timings)
    base_metrics = evaluate_base(cfg, out, files)
    ctx_cache: dict[int, Any] = {}
    results: dict[str, Any] = {}
    for name, (data_m, param_m, order) in plan.items():
        per_seed = []
        for seed in seeds:
            d = out / safe_name(name) / f"seed{seed}"
            t0 = time.time()
            sel_dir, cost = select_for(cfg, name, data_m, param_m, order, seed, d, files, ctx_cache)
            sel_wall = time.time() - t0
            train_dir, train_info = train_for(cfg, sel_dir, data_m, param_m, seed, d, files)
            metrics = evaluate_for(cfg, train_dir, d, files)
            per_seed.append({"seed": seed, "metrics": metrics, "selection_cost": cost, "selection_wall_s": sel_wall,
                             "train": train_info})
        results[name] = {"data": data_m, "param": param_m, "order": order, "seeds": per_seed,
                         "summary": summarise_method(per_seed)}
        write_json(out / "results.json", {"base": base_metrics, "methods": results, "config": dataclasses.asdict(cfg)})
    write_outputs(cfg, out, base_metrics, results)
    print(f"\ncomparison table: {out / 'results.md'}")
    return 0


def safe_name(name: str) -> str:
    return name.replace("→", "-to-").replace("->", "-to-").replace("+", "_plus_")


def evaluate_base(cfg: CompareConfig, out: Path, files: dict[str, Path]) -> dict:
    from dualsft.evaluation import evaluate

    d = out / "base" / "eval"
    if not (d / "metrics.json").exists():
        evaluate.main(stage_config(cfg.eval, data_dir=str(files["test"].parent), train_dir="none", out=str(d)))
    return read_json(d / "metrics.json")["models"]["model"]


def scoring_cost(run: Path) -> dict[str, Any]:
    """DualSFT's selection cost from RUN/scores/summary.json: wall time and passes of the scoring run."""
    s = read_json(run / "scores" / "summary.json")
    timings = s.get("timings", {})
    wall = sum(t.get("wall_time_s", 0.0) for t in timings.values())
    return {"wall_s": wall, "passes": list(timings), "examples_processed": sum(t.get("examples", 0) for t in
                                                                                timings.values())}


def select_for(cfg: CompareConfig, name: str, data_m: str, param_m: str, order: str, seed: int, d: Path,
               files: dict[str, Path], ctx_cache: dict[int, Any]) -> tuple[Path, dict]:
    """Write the method's selection into d/selection and its cost into d/selection_cost.json (resuming a
    finished one); returns (folder, cost)."""
    sel, cost_file = d / "selection", d / "selection_cost.json"
    if cost_file.exists() and (sel / "subset.jsonl").exists():
        return sel, read_json(cost_file)
    if (data_m, param_m) == ("dualsft", "dualsft"):
        cost = select_dualsft(cfg, order, sel)
    else:
        cost = select_baseline_for(cfg, data_m, param_m, order, seed, sel, files, ctx_cache)
    write_json(cost_file, cost)
    return sel, cost


def select_dualsft(cfg: CompareConfig, order: str, sel: Path) -> dict:
    """DualSFT on both axes through the real `dualsft select` stage (with joint refinement for dualsft-joint)."""
    from dualsft.selection import select

    rounds = cfg.select.joint_rounds if order == "joint" else 0
    t0 = time.time()
    select.main(stage_config(cfg.select, out=str(sel.resolve()), joint_rounds=rounds, overwrite=True, plot=False))
    cost = scoring_cost(Path(cfg.run_dir))
    cost["wall_s"] += time.time() - t0
    cost["note"] = "shared DualSFT scoring passes + this selection" + (f" with {rounds} joint round(s)" if rounds else "")
    surrogate = read_json(sel / "summary.json").get("surrogate") or {}
    cost["examples_processed"] += sum(surrogate.get("passes", {}).values())
    return cost


def baseline_context(cfg: CompareConfig, files: dict[str, Path], seed: int, cache: dict[int, Any]) -> Any:
    """The BaselineContext (θw, θ0, pool/target batches, c) built once and re-seeded per seed."""
    from dualsft.baselines.less import LessConfig
    from dualsft.baselines.registry import DualSFTScores, make_context
    from dualsft.data.formats import batches, load_examples, tokenize_examples
    from dualsft.io import load_tensors
    from dualsft.models import load_model, load_tokenizer
    from dualsft.selection.select import mask_spec

    if "base" not in cache:
        run = Path(cfg.run_dir)
        tok = load_tokenizer(cfg.model)
        warm = run / "warmup" / "model"
        model = load_model(str(warm) if warm.exists() else cfg.model, cfg.dtype, cfg.device)
        base = load_model(cfg.model, cfg.dtype, cfg.device)
        curv = run / "warmup" / "exp_avg_sq.safetensors"
        pool_ex = load_examples(files["pool"])
        pool_t = tokenize_examples(pool_ex, tok, cfg.template, cfg.max_length, cfg.drop_empty, "pool")
        val_t = tokenize_examples(load_examples(files["val"]), tok, cfg.template, cfg.max_length, cfg.drop_empty, "val")
        cache["base"] = dict(model=model, pool_batches=batches(pool_t, cfg.score.batch_size, tok.pad_token_id),
                             target_batches=batches(val_t, cfg.score.batch_size, tok.pad_token_id), base_model=base,
                             curvature=load_tensors(curv) if curv.exists() else None, pool=pool_ex)
    c = cache["base"]
    scores = DualSFTScores(Path(cfg.run_dir) / "scores", mask_spec(cfg.select))
    return make_context(c["model"], c["pool_batches"], cfg.select.data_budget, cfg.select.param_budget,
                        target_batches=c["target_batches"], base_model=c["base_model"], curvature=c["curvature"],
                        seed=seed, less=LessConfig(dim=cfg.less_dim), progress=True, dualsft=scores), c["pool"]


def select_baseline_for(cfg: CompareConfig, data_m: str, param_m: str, order: str, seed: int, sel: Path,
                        files: dict[str, Path], cache: dict[int, Any]) -> dict:
    from dualsft.baselines.registry import select_baseline
    from dualsft.baselines.writer import write_selection

    """Any other pair through the registry; a DualSFT axis adds the shared scoring passes to the cost."""
    ctx, pool = baseline_context(cfg, files, seed, cache)
    selection = select_baseline(data_m, param_m, ctx, order)  # type: ignore[arg-type]
    write_selection(sel, selection, pool)
    cost = dict(selection.cost)
    if "dualsft" in (data_m, param_m):
        shared = scoring_cost(Path(cfg.run_dir))
        cost.update(wall_s=cost["wall_s"] + shared["wall_s"],
                    examples_processed=cost["examples_processed"] + shared["examples_processed"],
                    note="shared DualSFT scoring passes + this selection", shared_scoring=shared)
    return cost


def train_for(cfg: CompareConfig, sel: Path, data_m: str, param_m: str, seed: int, d: Path,
              files: dict[str, Path]) -> tuple[Path, dict]:
    from dualsft.training import train

    out = d / "train"
    mask = sel / "mask.safetensors"
    method, extra = cfg.train.method, {}
    if param_m == "lora":
        info = read_json(sel / "summary.json").get("info", {})
        r = int(info.get("lora_rank", 16))
        method, extra = "lora", {"lora_r": r, "lora_alpha": 2 * r, "lr": None}
    elif not mask.exists():
        method = "full"
    if not (out / "delta.safetensors").exists() and not (out / "adapter" / "adapter_config.json").exists():
        options = dict(train_file=str(sel / "subset.jsonl"), mask=str(mask) if mask.exists() else "none",
                       method=method, out=str(out), seed=seed, overwrite=True)
        run_stage(f"train {d.parent.name}/{d.name}", train.main, stage_config(cfg.train, **{**options, **extra}), {})
    info = read_json(out / "adapter.json") if (out / "adapter.json").exists() else {}
    metrics = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    return out, {"method": method, "trainable": get(info, "result", "trainable_entries"),
                 "wall_s": metrics[-1].get("time") if metrics else None, "steps": len(metrics)}


def evaluate_for(cfg: CompareConfig, train_dir: Path, d: Path, files: dict[str, Path]) -> dict:
    from dualsft.evaluation import evaluate

    out = d / "eval"
    if not (out / "metrics.json").exists():
        run_stage(f"eval {d.parent.name}/{d.name}", evaluate.main, stage_config(
            cfg.eval, data_dir=str(files["test"].parent), train_dir=str(train_dir), out=str(out), eval_base=False,
            overwrite=True), {})
    return read_json(out / "metrics.json")["models"]["tuned"]


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


def write_outputs(cfg: CompareConfig, out: Path, base: dict, results: dict[str, Any]) -> None:
    cols = list(METRICS)
    pct = {"target acc", "stability acc"}

    def cell(stat: dict, col: str) -> str:
        if stat.get("n", 0) == 0:
            return "—"
        if col in pct:
            return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
        return f"{stat['mean']:.3f} ± {stat['std']:.3f}"

    rows = [["base (no tuning)"] + [cell(mean_std([get(base, *METRICS[c])]), c) for c in cols] + ["—"] * 4]
    for name, r in results.items():
        s = r["summary"]
        rows.append([name] + [cell(s[c], c) for c in cols] +
                    [f"{s['selection s']['mean']:.0f}", count_cell(s.get("selection examples", {})),
                     f"{s['train s']['mean']:.0f}" if s["train s"]["n"] else "—",
                     f"{s['trainable']:,}" if isinstance(s.get("trainable"), int) else "—"])
    header = (["method"] + [c + (" %" if c in pct else "") for c in cols]
              + ["selection s", "selection examples", "train s", "trainable"])
    seeds = parse_seeds(cfg.seeds)
    sizes = ", ".join(f"{c.split()[0]} n={get(base, *METRICS[c][:-1], 'n')}" for c in ("target loss", "stability loss",
                                                                                       "general loss"))
    text = (f"Budgets: data {cfg.select.data_budget}, params {cfg.select.param_budget}; seeds {seeds}; mean ± std over seeds; "
            f"examples per seed: {sizes}. selection examples = examples pushed through a model while selecting "
            f"(DualSFT: its shared scoring passes; every gradient-based method also reuses the warm-up).\n\n"
            + markdown_table(header, rows))
    (out / "results.md").write_text(text)
    points = {name: (r["summary"]["stability loss"]["mean"], r["summary"]["stability loss"]["std"],
                     100 * r["summary"]["target acc"]["mean"], 100 * r["summary"]["target acc"]["std"])
              for name, r in results.items()}
    base_x, base_y = get(base, *METRICS["stability loss"]), get(base, *METRICS["target acc"])
    points["base"] = (float("nan") if base_x is None else base_x, 0.0,
                      float("nan") if base_y is None else 100 * base_y, 0.0)  # 0% accuracy is a real point
    scatter_plot(out / "tradeoff.png", points, "stability loss on held-out tasks (lower = less forgetting)",
                 "target accuracy % (higher = more plasticity)", "stability vs plasticity at matched budgets")
    plot_score_distributions(cfg, out, results)


def count_cell(stat: dict) -> str:
    """Mean count over seeds, with thousands separators; — when unrecorded."""
    return f"{stat['mean']:,.0f}" if stat.get("n") else "—"


def plot_score_distributions(cfg: CompareConfig, out: Path, results: dict[str, Any]) -> None:
    """φ_data of the whole pool, and of the examples each data selector picked (first seed)."""
    scores_path = Path(cfg.run_dir) / "scores" / "data_scores.jsonl"
    if not scores_path.exists():
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
