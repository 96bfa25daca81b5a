"""`dualsft score`: the dual scores φ_param and φ_data at θw (METHOD.md §3-§5 step 3).

    dualsft score --pool data/pool.jsonl --target data/target.jsonl --run-dir runs/demo

Passes (each with a progress bar in examples/s; wall time recorded):
    target     v_new = mean target gradient                        (one backward per batch)
    anchor     v_prior = ∇ τ²·weighted KL(θ0 || θw) on the anchors  (skipped when λ_prior = 0, or at θ0
               where it is exactly zero)
    order 1:   pool       G and φ_data = ⟨ηv, g_n⟩ from the SAME backward
    order 2:   pool_G     G = Σ_n g_n;   then u = ηv − ½η² c⊙G;   pool_rows  φ_data = ⟨u, g_n⟩
Data parallel (``torchrun --nproc_per_node N -m dualsft score ...``): the target, anchor and pool examples
are sharded across ranks (``dualsft.distributed.shard``); v_new, v_prior and G are all-reduced as SUMS and
only then divided by the GLOBAL |V| and Σw; row scores are gathered back into pool order; rank 0 writes.
Resume (``--checkpoint-every N``, batches; 0 = off): every pass saves its partial sums / row chunks every N
batches and when it ends to RUN/scores/progress/<pass>.safetensors (+ .json; ``<pass>.rank<r>`` per rank
under data parallelism, resumed only with the same world size). A rerun of the same command (equal
metadata) skips finished passes and the done batches of the interrupted one, and gives bitwise the result
of an uninterrupted run on CPU; --overwrite starts over. progress/ is deleted once the outputs are written.
Writes RUN/scores/ (the output contract; other stages read these names):
    param_scores.safetensors   φ_param = u⊙G, float32, one tensor per trainable parameter (tied once)
    data_scores.jsonl          one line per pool example, pool order: {"index", "score", "loss", "tokens", ...}
    u.safetensors, v.safetensors (v = λ_new v_new + λ_prior v_prior), grad_sum.safetensors (G): float32
    summary.json               uᵀG, Σφ_param, Σφ_data, settings, coverage, passes, timings, norms of u's terms
    metadata.json
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from dualsft import distributed as dist
from dualsft.config import CommonConfig, opt, require
from dualsft.data.formats import TokenizedExample, batches
from dualsft.errors import ConfigError, MetadataMismatchError
from dualsft.io import load_tensors, save_tensors, write_json, write_jsonl
from dualsft.models import load_model, load_tokenizer, model_fingerprint
from dualsft.runs import build_metadata, prepare_stage_dir
from dualsft.scoring.data import load_split, sample_positions
from dualsft.scoring.prior import normalise_prior, prior_gradient_sum, prior_normaliser
from dualsft.scoring.progress import PROGRESS_DIR, PassCheckpoint
from dualsft.scoring.rows import score_pool
from dualsft.scoring.stats import combine_u, gradient_sum, param_scores, trainable_params
from dualsft.scoring.warmup import warmup_state

log = logging.getLogger(__name__)

HELP = "dual scores at θw: φ_param = u⊙G per parameter entry and φ_data = ⟨u, g_n⟩ per pool example"
FILES = {"param_scores": "param_scores.safetensors", "data_scores": "data_scores.jsonl", "u": "u.safetensors",
         "v": "v.safetensors", "grad_sum": "grad_sum.safetensors", "summary": "summary.json"}
RESULT_NEUTRAL = ("config.checkpoint_every",)  # options that never change the scores: a rerun may change them
ANCHOR_SEED_OFFSET = 1  # the anchor slice uses seed+1 so it differs from the warm-up slice of the same seed


@dataclass(frozen=True)
class ScoreConfig(CommonConfig):
    """Options of `dualsft score` (defaults: the authors' release, METHOD.md §3-§5)."""

    pool: str = opt("", "pool data file (the examples to score)")
    target: str = opt("", "target/validation data file V (v_new is its mean gradient)")
    order: int = opt(2, "2: u = ηv − ½η²c⊙G (needs the warm-up's curvature); 1: u = ηv (one pool pass)")
    eta: float = opt(2e-5, "η, the step size of the one-step surrogate")
    lambda_new: float = opt(1.0, "λ_new, weight of the target loss in L_val")
    lambda_prior: float = opt(0.2, "λ_prior, weight of the KL-to-base term in L_val (0 skips the anchor pass)")
    tau: float = opt(2.0, "τ, the KL temperature")
    confidence: Literal["max_prob", "uniform", "entropy_inv"] = opt("max_prob", "anchor weight w_i")
    prior_normalisation: Literal["weighted_mean", "release"] = opt(
        "weighted_mean", "divide by Σw (weighted mean) or by max(Σw, 1) as the authors' release does")
    anchor_ratio: float = opt(0.02, "fraction of the pool used as the anchor set A (seeded)")
    batch_size: int = opt(4, "examples per scoring batch")
    method: Literal["ghost", "jvp", "exact"] = opt(
        "ghost", "row scores: ghost (hooks), jvp (forward-mode, generic), exact (one backward per example; slow)")
    curvature: str = opt("", "safetensors file of c per parameter (default: RUN/warmup/exp_avg_sq.safetensors)")
    stats_dtype: Literal["float32", "float64"] = opt("float32", "dtype of the G / v / u accumulators")
    checkpoint_every: int = opt(50, "save each pass's partial sums every N batches to RUN/scores/progress/, "
                                "so a rerun resumes after a kill (0: off)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.order in (1, 2), "order", self.order, "use 1 or 2")
        require(self.eta > 0, "eta", self.eta, "must be positive")
        require(self.tau > 0, "tau", self.tau, "must be positive")
        require(self.lambda_new >= 0, "lambda-new", self.lambda_new, "a weight is >= 0")
        require(self.lambda_prior >= 0, "lambda-prior", self.lambda_prior, "a weight is >= 0")
        require(0 <= self.anchor_ratio <= 1, "anchor-ratio", self.anchor_ratio, "a fraction of the pool in [0, 1]")
        require(self.batch_size >= 1, "batch-size", self.batch_size, "must be at least 1")


CONFIG = ScoreConfig


def timed_pass(name: str, n: int, fn: Any, timings: dict[str, dict[str, float]]) -> Any:
    """Run fn(bar) under a tqdm bar of ``n`` examples; record wall time and examples/s under ``name``."""
    t0 = time.perf_counter()
    mine = len(dist.shard(n, dist.rank(), dist.world_size()))  # this rank's examples; rank 0 shows its bar
    with tqdm(total=mine, unit="ex", desc=name, disable=not dist.is_main()) as bar:
        out = fn(bar)
    wall = time.perf_counter() - t0
    timings[name] = {"wall_time_s": wall, "examples": n, "examples_per_s": n / wall if wall > 0 else float("inf")}
    log.info("pass %-9s %6d examples in %7.1f s (%.2f ex/s)", name, n, wall, timings[name]["examples_per_s"])
    return out


def coverage(model: torch.nn.Module) -> dict[str, Any]:
    """Which parameters are scored: trainable ones; frozen ones and tied aliases are listed."""
    all_named = list(model.named_parameters(remove_duplicate=False))
    unique = dict(model.named_parameters())
    trainable = trainable_params(model)
    return {"scored_tensors": len(trainable), "scored_entries": int(sum(p.numel() for p in trainable.values())),
            "total_entries": int(sum(p.numel() for p in unique.values())),
            "frozen": [n for n, p in unique.items() if not p.requires_grad],
            "tied_aliases": [n for n, _ in all_named if n not in unique]}


def load_curvature(cfg: ScoreConfig, warm: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """c for order 2 (from --curvature or the warm-up); order 1 needs none."""
    path = cfg.curvature or (warm or {}).get("curvature")
    if cfg.order == 1:
        return None, None
    if not path:
        raise ConfigError("--order 2 needs the curvature c (Adam exp_avg_sq of the warm-up), but there is none: "
                          "run `dualsft warmup` with --warmup-ratio > 0 first, pass --curvature FILE, or use --order 1")
    return load_tensors(path), str(path)


def pool_rows(toks: list[TokenizedExample], scores: torch.Tensor, losses: torch.Tensor,
              order_idx: list[int]) -> list[dict[str, Any]]:
    """data_scores.jsonl rows in POOL order from scores/losses in batch order (``order_idx``: stable indices)."""
    at = {idx: k for k, idx in enumerate(order_idx)}
    return [{"index": t.index, "score": float(scores[at[t.index]]), "loss": float(losses[at[t.index]]),
             "tokens": t.n_response_tokens, "length": len(t.input_ids), "truncated": t.truncated} for t in toks]


def pass_checkpoint(progress_dir: Path | None, name: str, every: int, pass_batches: list) -> PassCheckpoint | None:
    """The progress checkpoint of one pass (None when there is no progress folder)."""
    return None if progress_dir is None else PassCheckpoint(progress_dir, name, every, len(pass_batches))


def target_mean_gradient(model: torch.nn.Module, target: list[TokenizedExample], params: dict, batch_size: int,
                         pad: int, acc_dtype: torch.dtype, bar: Any, progress_dir: Path | None = None,
                         every: int = 0) -> dict[str, torch.Tensor]:
    """v_new = mean over the WHOLE target set V of g_q: this rank's shard summed, all-reduced, ÷ |V|.
    ``progress_dir``/``every``: resume / save this rank's partial sum (scoring/progress.py)."""
    if not target:
        raise ConfigError("the target set is empty: v_new needs at least one target example")
    mine, _ = dist.local_items(target)
    b = batches(mine, batch_size, pad, sort_by_length=True)
    acc = gradient_sum(model, b, params, acc_dtype, bar, pass_checkpoint(progress_dir, "target", every, b))
    dist.all_reduce_dict_(acc)
    return {n: g / len(target) for n, g in acc.items()}


def anchor_prior_gradient(model: torch.nn.Module, base: torch.nn.Module, anchors: list[TokenizedExample],
                          params: dict, cfg: ScoreConfig, pad: int, acc_dtype: torch.dtype,
                          bar: Any, progress_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """v_prior over the whole anchor set: shard sums of τ²Σw∇KL and Σw all-reduced, then ÷ Z(global Σw).
    ``progress_dir``: resume / save this rank's partial sums every --checkpoint-every batches."""
    prior_normaliser(1.0, cfg.prior_normalisation)  # validate the option before any compute
    mine, _ = dist.local_items(anchors)
    b = batches(mine, cfg.batch_size, pad, sort_by_length=True)
    acc, wsum = prior_gradient_sum(model, base, b, params, cfg.tau, cfg.confidence, acc_dtype, bar,
                                   pass_checkpoint(progress_dir, "anchor", cfg.checkpoint_every, b))
    dist.all_reduce_dict_(acc)
    (wsum,) = dist.all_reduce_sum([wsum])
    return normalise_prior(acc, wsum, cfg.prior_normalisation)


def main(cfg: ScoreConfig) -> int:
    """Compute and write RUN/scores/ (see module docstring)."""
    t_start = time.time()
    ctx = dist.dist_context(cfg.device)
    device = dist.rank_device(cfg.device)
    if cfg.order not in (1, 2):
        raise ConfigError(f"--order must be 1 or 2, got {cfg.order}")
    warm = warmup_state(cfg.run_dir)
    if warm and warm.get("metadata", {}).get("model", {}).get("id") not in (None, cfg.model):
        raise MetadataMismatchError(f"RUN/warmup was made from --model {warm['metadata']['model']['id']!r}, not "
                                    f"{cfg.model!r}; use the same --model or rerun the warm-up", "model.id")
    at_theta0 = not (warm and warm.get("model_dir"))
    if at_theta0:
        log.info("no warm-up checkpoint in %s: scoring at θ0", Path(cfg.run_dir) / "warmup")
    c, c_path = load_curvature(cfg, warm)
    acc_dtype = torch.float64 if cfg.stats_dtype == "float64" else torch.float32
    tokenizer = load_tokenizer(cfg.model)
    pool = load_split(cfg.pool, tokenizer, cfg, "pool")
    target = load_split(cfg.target, tokenizer, cfg, "target")
    model = load_model(cfg.model if at_theta0 else warm["model_dir"], cfg.dtype, device)  # type: ignore[index]
    fp = model_fingerprint(model)
    data_files = {"pool": cfg.pool, "target": cfg.target, **({"curvature": c_path} if c_path else {})}
    meta = build_metadata("scores", cfg, model_id=cfg.model if at_theta0 else warm["model_dir"],  # type: ignore[index]
                          model_fingerprint=fp, data_files=data_files, extra={"scored_at": "theta_0" if at_theta0
                                                                             else "theta_w"})
    out = Path(cfg.run_dir) / "scores"
    if ctx.is_main:  # one writer; the other ranks wait until the folder is ready
        out = prepare_stage_dir(cfg.run_dir, "scores", meta, cfg.overwrite, ignore=RESULT_NEUTRAL)
        if cfg.overwrite:  # --overwrite starts over, never resumes
            shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    dist.barrier()
    progress_dir = out / PROGRESS_DIR if cfg.checkpoint_every > 0 else None
    if all((out / f).exists() for f in FILES.values()):
        log.info("%s is complete for these settings; nothing to do (pass --overwrite to redo it)", out)
        if ctx.is_main:
            shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)  # left over by a kill after the last write
        return 0
    params = trainable_params(model)
    pad = tokenizer.pad_token_id
    timings: dict[str, dict[str, float]] = {}
    skipped: list[str] = []

    v_new = timed_pass("target", len(target), lambda bar: target_mean_gradient(
        model, target, params, cfg.batch_size, pad, acc_dtype, bar, progress_dir, cfg.checkpoint_every), timings)
    v_prior, anchors = None, []
    if cfg.lambda_prior == 0:
        skipped.append("anchor pass: --lambda-prior 0")
    elif at_theta0:
        skipped.append("anchor pass: scoring at θ0, where the KL to θ0 has zero gradient (v_prior = 0)")
    else:
        anchors = sample_positions(len(pool), cfg.anchor_ratio, cfg.seed + ANCHOR_SEED_OFFSET)
        if not anchors:
            raise ConfigError("--anchor-ratio gives no anchor example; raise it or pass --lambda-prior 0")
        base = load_model(cfg.model, cfg.dtype, device)
        v_prior = timed_pass("anchor", len(anchors), lambda bar: anchor_prior_gradient(
            model, base, [pool[i] for i in anchors], params, cfg, pad, acc_dtype, bar, progress_dir), timings)
        del base
    for s in skipped:
        log.info("skipped %s", s)

    mine, _ = dist.local_items(pool)  # this rank's shard of the pool (all of it in one process)
    pool_b = batches(mine, cfg.batch_size, pad, sort_by_length=True)  # less padding; indices travel along
    order_idx = [int(i) for b in pool_b for i in b["index"]]
    every = cfg.checkpoint_every
    if cfg.order == 1:
        u, v, norms = combine_u(v_new, v_prior, None, None, cfg.eta, cfg.lambda_new, cfg.lambda_prior, 1)
        scores, losses, G = timed_pass("pool", len(pool), lambda bar: score_pool(
            model, pool_b, u, cfg.method, grad_sum=True, acc_dtype=acc_dtype, progress=bar,
            checkpoint=pass_checkpoint(progress_dir, "pool", every, pool_b)), timings)
        dist.all_reduce_dict_(G)  # type: ignore[arg-type]
    else:
        G = timed_pass("pool_G", len(pool), lambda bar: gradient_sum(
            model, pool_b, params, acc_dtype, bar, pass_checkpoint(progress_dir, "pool_G", every, pool_b)), timings)
        dist.all_reduce_dict_(G)  # G = Σ_n g_n over the whole pool before u uses it
        u, v, norms = combine_u(v_new, v_prior, G, c, cfg.eta, cfg.lambda_new, cfg.lambda_prior, 2)
        scores, losses, _ = timed_pass("pool_rows", len(pool), lambda bar: score_pool(
            model, pool_b, u, cfg.method, grad_sum=False, progress=bar,
            checkpoint=pass_checkpoint(progress_dir, "pool_rows", every, pool_b)), timings)
    assert G is not None
    scores, losses, order_idx = gather_pool_rows(pool, scores, losses, order_idx)
    phi = param_scores(u, G)
    if not ctx.is_main:  # rank 0 writes; the others wait for it and leave
        dist.barrier()
        return 0
    save_tensors(out / FILES["param_scores"], phi, metadata={"what": "phi_param = u*G"})
    save_tensors(out / FILES["u"], {n: t.float() for n, t in u.items()}, metadata={"what": "u"})
    save_tensors(out / FILES["v"], {n: t.float() for n, t in v.items()}, metadata={"what": "v"})
    save_tensors(out / FILES["grad_sum"], {n: t.float() for n, t in G.items()}, metadata={"what": "G"})
    write_jsonl(out / FILES["data_scores"], pool_rows(pool, scores, losses, order_idx))
    utg = sum(float((u[n].double() * G[n].double()).sum()) for n in u)
    summary = {
        "uTG": utg, "sum_param": sum(float(t.double().sum()) for t in phi.values()), "sum_data": float(scores.sum()),
        "order": cfg.order, "eta": cfg.eta, "lambda_new": cfg.lambda_new, "lambda_prior": cfg.lambda_prior,
        "tau": cfg.tau, "confidence": cfg.confidence, "prior_normalisation": cfg.prior_normalisation,
        "method": cfg.method, "stats_dtype": cfg.stats_dtype, "scored_at": "theta_0" if at_theta0 else "theta_w",
        "curvature": c_path, "coverage": coverage(model), "passes": list(timings), "timings": timings,
        "examples_per_s": len(pool) / sum(t["wall_time_s"] for k, t in timings.items() if k.startswith("pool")),
        "u_term_norms": norms, "pool_size": len(pool), "target_size": len(target),
        "anchor_indices": [pool[i].index for i in anchors], "skipped": skipped,
        "mean_pool_loss": float(losses.mean()), "files": FILES, "wall_time_s": time.time() - t_start,
        "world_size": ctx.world_size,
        "file_meaning": {"param_scores": "phi_param = u*G", "u": "u", "v": "v = lambda_new v_new + lambda_prior "
                         "v_prior", "grad_sum": "G = sum_n g_n over the pool", "data_scores": "phi_data[n] = <u, g_n>"},
    }
    write_json(out / FILES["summary"], summary)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)  # every output is written: nothing left to resume
    log.info("uᵀG = %.6e  Σφ_param = %.6e  Σφ_data = %.6e  (%d examples, %s, order %d)", utg, summary["sum_param"],
             summary["sum_data"], len(pool), cfg.method, cfg.order)
    dist.barrier()
    return 0


def gather_pool_rows(pool: list[TokenizedExample], scores: torch.Tensor, losses: torch.Tensor,
                     order_idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """This rank's (φ_data, l) in its batch order -> every example's, in POOL order (scores, losses [N],
    and the stable indices in pool order for ``pool_rows``). One process: just the reordering."""
    position = {t.index: i for i, t in enumerate(pool)}
    both = dist.gather_rows(torch.stack([scores, losses], 1), [position[i] for i in order_idx], len(pool))  # [N, 2]
    return both[:, 0], both[:, 1], [t.index for t in pool]
