"""`dualsft score`: the dual scores φ_param and φ_data at θw (docs/method.md §3-§5 step 3).

    dualsft score --pool data/pool.jsonl --target data/target.jsonl --run-dir runs/demo

Passes (each with a progress bar in examples/s; wall time recorded):
    target     v_new = mean target gradient                        (one backward per batch)
               (--target-gradient normalized: a target_norms pass for ‖g_q‖ first, then a weighted backward)
    anchor     v_prior = ∇ τ²·weighted KL(θ0 || θw) on the anchors  (skipped when λ_prior = 0, or at θ0
               where it is exactly zero)
    order 1:   pool       G and φ_data = ⟨ηv, g_n⟩ from the SAME backward
    order 2:   pool_G     G = Σ_n g_n;   then u = ηv − ½η² c⊙G;   pool_rows  φ_data = ⟨u, g_n⟩
    The defaults are LESS's form of the scores (docs/method.md §4 "Defaults of the scores"; the paper's formula:
    --precondition none --data-params all --data-score inner --target-gradient mean, i.e. --preset release):
    --data-score cosine: the row pass also gives ‖g_n‖² (scoring/norms.py) and "score" = ⟨u, g_n⟩/‖g_n‖
    --score-tokens answer: every pass's loss covers the answer's own tokens (no template end tokens)
    --precondition adam: u = P⊙(ηv − ½η²c⊙P⊙G), P = 1/(√c + ε) (Adam's step); adam-step: P = 1/(√(β2c +
    (1−β2)v²) + ε) (the step v itself would take, as LESS simulates it); auto (default): adam-step when the
    warm-up's c exists, else none, resolved once and logged (summary.json: precondition, precondition_requested)
    --data-params linear: the row pass uses u on the linear layers only (φ_data = ⟨u_R, g_n⟩; summary.json's
    sum_param_rows = Σ_R φ_param)
Every pass runs on scoring/passes.py; u and φ_param are dualsft/method.py's.
--gradient-checkpointing: every pass (target_norms, target, anchor, pool / pool_G, pool_rows) runs the model with
its decoder layers under non-reentrant checkpointing, still in eval mode (``models.checkpointed_layers``): each
layer keeps only its input in the forward and recomputes the rest in the backward. The ghost capture saves its
inputs as autograd tensors, so they are recomputed too (scoring/ghost.py). Same scores (result-neutral: a
rerun may toggle it); about one more forward per backward. --method ghost or exact (jvp is refused).
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
    summary.json               uᵀG, Σφ_param, Σφ_data (the inner scores), Σ_R φ_param, settings, coverage, passes,
                               timings, norms of u's terms
    settings.json              the ScoringSettings record (scoring/settings.py) later stages read η, order ... from
    metadata.json
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dualsft import distributed as dist
from dualsft.data.formats import TokenizedExample
from dualsft.errors import ConfigError, MetadataMismatchError
from dualsft.io import load_tensors, save_tensors, write_json, write_jsonl
from dualsft.method import (
    check_order,
    combine_u,
    cosine_scores,
    interaction,
    missing_curvature,
    normalized_target_weights,
    param_scores,
    restrict,
)
from dualsft.models import checkpointed_layers, load_tokenizer, model_fingerprint
from dualsft.runs import build_metadata, portable_path, prepare_stage_dir
from dualsft.scoring.data import load_split, sample_positions
from dualsft.scoring.layers import linear_weight_names
from dualsft.scoring.passes import sharded_pass
from dualsft.scoring.prior import normalise_prior, prior_accumulators, prior_normaliser, prior_step, split_prior_sums
from dualsft.scoring.progress import PROGRESS_DIR
from dualsft.scoring.rows import row_accumulators, row_step
from dualsft.scoring.settings import ScoreConfig, ScoringSettings, resolve_precondition, save_settings
from dualsft.scoring.sharded import gather_whole, is_slot, load_local_rows, shard_for_scoring
from dualsft.scoring.stats import gradient_step, trainable_params, weighted_gradient_step, zeros_like_params
from dualsft.scoring.warmup import warmup_state
from dualsft.training.sharded import load_stage_model, resolve_sharding, shard_model

log = logging.getLogger(__name__)

HELP = "dual scores at θw: φ_param = u⊙G per parameter entry and φ_data = ⟨u, g_n⟩ per pool example"
FILES = {"param_scores": "param_scores.safetensors", "data_scores": "data_scores.jsonl", "u": "u.safetensors",
         "v": "v.safetensors", "grad_sum": "grad_sum.safetensors", "summary": "summary.json"}
# options that never change the scores (loss_chunk: up to float rounding; gradient_checkpointing: recomputes the
# same activations; sharding: the order of float sums): a rerun may change them
RESULT_NEUTRAL = ("config.checkpoint_every", "config.loss_chunk", "config.gradient_checkpointing",
                  "config.sharding")
ANCHOR_SEED_OFFSET = 1  # the anchor slice uses seed+1 so it differs from the warm-up slice of the same seed
ROWS = ("scores", "losses")  # the per-example rows of a pool pass: φ_data[n] and l_n


CONFIG = ScoreConfig


@dataclass
class ScoringInputs:
    """Everything the passes need, loaded once: θw (or θ0), the tokenised splits, c, the output folder."""

    model: torch.nn.Module
    pad_id: int
    pool: list[TokenizedExample]
    target: list[TokenizedExample]
    c: dict[str, torch.Tensor] | None
    c_path: str | None
    precondition: str  # --precondition as used (auto resolved: adam-step when c exists, else none)
    at_theta0: bool
    out: Path
    done: bool  # every output already written for these settings


def main(cfg: ScoreConfig) -> int:
    """Compute and write RUN/scores/ (see module docstring): the scoring step of docs/method.md §5."""
    t_start = time.time()
    ctx = dist.dist_context(cfg.device)
    cfg = replace(cfg, sharding=resolve_sharding(cfg.sharding, cfg.scoring_blocker()))
    check_order(cfg.order)
    requested = cfg.precondition
    inp = prepare_inputs(cfg, ctx.is_main)
    if inp.done:
        return 0
    cfg = replace(cfg, precondition=inp.precondition)  # auto resolved: every pass, settings.json, summary.json
    model, timings, skipped = inp.model, {}, []
    R = row_parameters(cfg, model, trainable_params(model))
    slots = shard_for_scoring(model, R) if cfg.sharding == "fsdp" else None  # u of R gathered with the weights
    params = trainable_params(model)
    if slots is not None and inp.c_path:
        inp.c = load_local_rows(inp.c_path, params)  # this rank's rows of c only
    acc_dtype = torch.float64 if cfg.stats_dtype == "float64" else torch.float32
    run = partial(sharded_pass, batch_size=cfg.batch_size, pad_id=inp.pad_id, timings=timings,
                  progress_dir=inp.out / PROGRESS_DIR if cfg.checkpoint_every > 0 else None,
                  every=cfg.checkpoint_every, presummed=set(params) if slots is not None else ())

    # --gradient-checkpointing: every pass below recomputes the decoder layers in its backward (eval mode kept)
    with checkpointed_layers(model, cfg.gradient_checkpointing):
        v_new, target_norms = target_direction(cfg, model, params, inp.target, run, acc_dtype)
        anchors = anchor_positions(cfg, inp, skipped)
        v_prior = None
        if anchors:  # v_prior = τ²Σw∇KL ÷ Z(global Σw)
            base = load_stage_model(cfg.model, cfg.dtype, cfg.device, "sdpa", cfg.sharding)
            if slots is not None:
                shard_model(base)  # the teacher θ0 sharded like the student: no rank holds a second whole model
            prior_sums = run("anchor", [inp.pool[i] for i in anchors], prior_step(model, base, params, cfg.tau,
                             cfg.confidence, cfg.loss_chunk), prior_accumulators(params, acc_dtype)).sums
            v_prior = normalise_prior(*split_prior_sums(prior_sums), cfg.prior_normalisation)
            del base
        for s in skipped:
            log.info("skipped %s", s)

        cosine = cfg.data_score == "cosine"  # the pool row pass also gives ‖g_n‖² (scoring/norms.py)
        rows = ROWS + (("sq_norms",) if cosine else ())
        adam = cfg.precondition  # none, or u for one Adam step: P per parameter (method.adam_scale / adam_step_scale)

        def directions(u: dict[str, torch.Tensor]) -> Any:  # what the row pass reads u from
            if slots is None:
                return restrict(u, R)
            slots.load(restrict(u, R))
            u.update(slots.shared_rows(u))  # the slots hold u's rows: u reads them instead of keeping a copy
            return slots

        if cfg.order == 1:  # G and φ_data = ⟨ηv, g_n⟩ from the SAME backward
            u, v, norms = combine_u(v_new, v_prior, None, inp.c, cfg.eta, cfg.lambda_new, cfg.lambda_prior, 1, adam)
            v_new = v_prior = None  # folded into v: not held through the pool pass
            pool = run("pool", inp.pool, row_step(model, directions(u), cfg.method, grad_sum=True, norms=cosine),
                       row_accumulators(model, True, acc_dtype), row_names=rows)
            G = pool.sums
        else:  # G = Σ_n g_n over the whole pool first; then u = ηv − ½η²c⊙G; then φ_data = ⟨u, g_n⟩
            G = run("pool_G", inp.pool, gradient_step(model, params), zeros_like_params(params, acc_dtype)).sums
            warn_missing_curvature(v_new, inp.c)
            u, v, norms = combine_u(v_new, v_prior, G, inp.c, cfg.eta, cfg.lambda_new, cfg.lambda_prior, 2, adam)
            v_new = v_prior = None
            pool = run("pool_rows", inp.pool, row_step(model, directions(u), cfg.method, norms=cosine), {},
                       row_names=rows)
        phi = param_scores(u, G)
    totals = identity_totals(u, G, phi, R)
    if slots is not None:  # every rank holds its rows: add the ranks' partial sums (norms: their squares)
        totals = dict(zip(totals, dist.all_reduce_sum(list(totals.values()))))
        norms = {k: x**0.5 for k, x in zip(norms, dist.all_reduce_sum([x**2 for x in norms.values()]))}
    held = [inp.c, G, u, v, phi, slots.local_shards() if slots is not None else None]
    totals["statistics_bytes_per_rank"] = per_rank(tensor_bytes(held))
    stats = {"u": u, "v": v, "G": G, "phi": phi, "norms": norms, "target_norms": target_norms, "totals": totals}
    write_tensors(inp.out, stats, (lambda t: gather_whole(t, params)) if slots is not None else None)
    if ctx.is_main:  # rank 0 writes; the others wait for it and leave
        write_scores(cfg, inp, stats, pool.rows, {"timings": timings, "skipped": skipped, "anchors": anchors,
                                                  "world_size": ctx.world_size, "t_start": t_start,
                                                  "precondition_requested": requested})
    dist.barrier()
    return 0


def tensor_bytes(groups: list[dict[str, torch.Tensor] | None]) -> int:
    """Bytes of the per-parameter statistics this process holds (each dict maps names to its tensors; under
    ``--sharding fsdp``, to this rank's rows); a tensor reachable twice (u and its slot) counts once."""
    seen = {(t.data_ptr(), t.numel(), t.dtype): t.numel() * t.element_size() for g in groups if g for t in g.values()}
    return sum(seen.values())


def per_rank(value: int) -> list[int]:
    """[value of rank 0, value of rank 1, ...] on every rank (a collective; [value] in one process)."""
    world, me = dist.world_size(), dist.rank()
    return [int(x) for x in dist.all_reduce_sum([float(value) if r == me else 0.0 for r in range(world)])]


def identity_totals(u: dict[str, torch.Tensor], G: dict[str, torch.Tensor], phi: dict[str, torch.Tensor],
                    rows_over: list[str]) -> dict[str, float]:
    """The column side of the row–column identity (docs/method.md §4), in float64: uᵀG, Σφ_param and Σ_{j∈R}
    φ_param (what Σ_n φ_data[n] must equal when φ_data sums over R only). Sums of entries: on FSDP shards each
    rank's partial sums add up across ranks."""
    return {"uTG": sum(float(interaction(u[n], G[n]).sum()) for n in u),
            "sum_param": sum(float(t.double().sum()) for t in phi.values()),
            "sum_param_rows": sum(float(phi[n].double().sum()) for n in rows_over)}


def row_parameters(cfg: ScoreConfig, model: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> list[str]:
    """The parameters φ_data sums over (``--data-params``): every scored one, or the linear layers' only."""
    if cfg.data_params == "all":
        return list(params)
    names = [n for n in linear_weight_names(model) if n in params]
    if not names:
        raise ConfigError("--data-params linear: this model has no trainable linear layer outside the embeddings "
                          "and the output head; use --data-params all")
    return names


def target_direction(cfg: ScoreConfig, model: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                     target: list[TokenizedExample], run: Any, acc_dtype: torch.dtype
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """v_new and (for ``--target-gradient normalized``) the target gradients' norms ‖g_q‖ [Q].

    mean: v_new = Σ_q g_q ÷ the GLOBAL |V| (shard sums all-reduced first). normalized: a norm pass (the
    ghost pass's exact ‖g_q‖, norms.py; the oracle with --method exact) gives w_q = mean‖g‖ / (Q‖g_q‖),
    then ONE weighted summed-loss backward per batch gives v_new = Σ_q w_q g_q (method.py)."""
    if cfg.target_gradient == "mean":
        target_sum = run("target", target, gradient_step(model, params), zeros_like_params(params, acc_dtype)).sums
        return {n: g / len(target) for n, g in target_sum.items()}, None
    norm_method = "exact" if cfg.method == "exact" else "ghost"  # jvp has no per-example norms: ghost's ‖g_q‖
    try:
        norm_step = row_step(model, {}, norm_method, norms=True)
    except ConfigError as e:  # a parameter ghost cannot score: under jvp, the hint to use jvp would loop
        if cfg.method != "jvp":
            raise
        raise ConfigError(f"{e}. --target-gradient normalized (the default) takes ‖g_q‖ from the ghost hooks even "
                          "under --method jvp: pass --target-gradient mean, or use --method exact") from e
    sq = run("target_norms", target, norm_step, {}, row_names=("sq_norms",))
    target_norms = sq.rows["sq_norms"].sqrt()  # [Q], target order
    w = normalized_target_weights(target_norms)
    weights = {t.index: float(w[i]) for i, t in enumerate(target)}
    v_new = run("target", target, weighted_gradient_step(model, params, weights),
                zeros_like_params(params, acc_dtype)).sums
    return v_new, target_norms


def prepare_inputs(cfg: ScoreConfig, is_main: bool) -> ScoringInputs:
    """Load θw (RUN/warmup's checkpoint; θ0 when there is none), c, the splits; resolve ``--precondition auto``
    from whether c exists; make RUN/scores/ (rank 0). metadata.json records the config as given (auto stays
    auto, so a rerun resolves it again; whether c exists is its data.curvature entry)."""
    warm = warmup_state(cfg.run_dir)
    if warm and warm.get("metadata", {}).get("model", {}).get("id") not in (None, cfg.model):
        raise MetadataMismatchError(f"RUN/warmup was made from --model {warm['metadata']['model']['id']!r}, not "
                                    f"{cfg.model!r}; use the same --model or rerun the warm-up", "model.id")
    at_theta0 = not (warm and warm.get("model_dir"))
    if at_theta0:
        log.info("no warm-up checkpoint in %s: scoring at θ0", Path(cfg.run_dir) / "warmup")
    precondition = resolve_precondition(cfg.precondition, curvature_file(cfg, warm))
    if cfg.precondition == "auto":
        log.info("--precondition auto: %s (%s)", precondition, "u for one Adam step, the warm-up's c exists"
                 if precondition == "adam-step" else "u for one SGD step: no c (no warm-up checkpoint, no --curvature)")
    # fsdp: each rank reads its rows of c later (from c_path)
    c, c_path = load_curvature(replace(cfg, precondition=precondition), warm, whole=cfg.sharding != "fsdp")
    tokenizer = load_tokenizer(cfg.model)
    pool = load_split(cfg.pool, tokenizer, cfg, "pool")
    target = load_split(cfg.target, tokenizer, cfg, "target")
    if not target:
        raise ConfigError("the target set is empty: v_new needs at least one target example")
    # θw's folder is recorded as the scores' model (select reloads it): relative, like every recorded path
    model_id = cfg.model if at_theta0 else portable_path(warm["model_dir"])  # type: ignore[index]
    model = load_stage_model(model_id, cfg.dtype, cfg.device, attention_for(cfg.method), cfg.sharding)
    data_files = {"pool": cfg.pool, "target": cfg.target, **({"curvature": c_path} if c_path else {})}
    meta = build_metadata("scores", cfg, model_id=model_id, model_fingerprint=model_fingerprint(model),
                          data_files=data_files, extra={"scored_at": scored_at(at_theta0)})
    out = Path(cfg.run_dir) / "scores"
    if is_main:  # one writer; the other ranks wait until the folder is ready
        out = prepare_stage_dir(cfg.run_dir, "scores", meta, cfg.overwrite, ignore=RESULT_NEUTRAL)
        if cfg.overwrite:  # --overwrite starts over, never resumes
            shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    dist.barrier()
    done = all((out / f).exists() for f in FILES.values())
    if done:
        log.info("%s is complete for these settings; nothing to do (pass --overwrite to redo it)", out)
        if is_main:
            shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)  # left over by a kill after the last write
    return ScoringInputs(model, tokenizer.pad_token_id, pool, target, c, c_path, precondition, at_theta0, out, done)


def attention_for(method: str) -> str:
    """The attention kernel of the scored model: eager for --method jvp (forward-mode AD has no rule for the
    fused kernels), SDPA otherwise (no B·heads·T² probabilities kept for the backward)."""
    return "eager" if method == "jvp" else "sdpa"


def scored_at(at_theta0: bool) -> str:
    """"theta_0" or "theta_w": where the scores were taken."""
    return "theta_0" if at_theta0 else "theta_w"


def anchor_positions(cfg: ScoreConfig, inp: ScoringInputs, skipped: list[str]) -> list[int]:
    """Positions of the anchor set A in the pool (seeded), or [] when the anchor pass is skipped (noted in
    ``skipped``): λ_prior = 0, or scoring at θ0 where the KL to θ0 has zero gradient (v_prior = 0)."""
    if cfg.lambda_prior == 0:
        skipped.append("anchor pass: --lambda-prior 0")
        return []
    if inp.at_theta0:
        skipped.append("anchor pass: scoring at θ0, where the KL to θ0 has zero gradient (v_prior = 0)")
        return []
    prior_normaliser(1.0, cfg.prior_normalisation)  # validate the option before any compute
    anchors = sample_positions(len(inp.pool), cfg.anchor_ratio, cfg.seed + ANCHOR_SEED_OFFSET)
    if not anchors:
        raise ConfigError("--anchor-ratio gives no anchor example; raise it or pass --lambda-prior 0")
    return anchors


def warn_missing_curvature(v: dict[str, torch.Tensor], c: dict[str, torch.Tensor] | None) -> None:
    """Log once that some parameters have no curvature estimate (their second-order term is 0)."""
    missing = missing_curvature(v, c)
    if missing:
        log.warning("no curvature for %d parameter(s) (e.g. %s): their second-order term is 0", len(missing),
                    missing[0])


def load_curvature(cfg: ScoreConfig, warm: dict[str, Any] | None,
                   whole: bool = True) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """(c, its file) for order 2 or --precondition adam|adam-step (from --curvature or the warm-up); order 1
    alone needs none. ``cfg.precondition`` is resolved (not auto). ``whole=False``: only the file
    (``--sharding fsdp`` reads each rank's rows of it)."""
    path = curvature_file(cfg, warm)
    if cfg.order == 1 and cfg.precondition == "none":
        return None, None
    if not path:
        if cfg.precondition != "none":
            raise ConfigError(f"--precondition {cfg.precondition} needs Adam's exp_avg_sq c from the warm-up, but there is none: "
                              "run `dualsft warmup` with --warmup-ratio > 0 first, pass --curvature FILE, or use "
                              "--precondition none")
        raise ConfigError("--order 2 needs the curvature c (Adam exp_avg_sq of the warm-up), but there is none: "
                          "run `dualsft warmup` with --warmup-ratio > 0 first, pass --curvature FILE, or use --order 1")
    return (load_tensors(path) if whole else None), str(path)


def curvature_file(cfg: ScoreConfig, warm: dict[str, Any] | None) -> str | None:
    """The file of c: --curvature, else the warm-up's exp_avg_sq.safetensors, else None."""
    return cfg.curvature or (warm or {}).get("curvature") or None


def coverage(model: torch.nn.Module) -> dict[str, Any]:
    """Which parameters are scored: trainable ones; frozen ones and tied aliases are listed."""
    all_named = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if not is_slot(n)]
    unique = {n: p for n, p in model.named_parameters() if not is_slot(n)}
    trainable = trainable_params(model)
    return {"scored_tensors": len(trainable), "scored_entries": int(sum(p.numel() for p in trainable.values())),
            "total_entries": int(sum(p.numel() for p in unique.values())),
            "frozen": [n for n, p in unique.items() if not p.requires_grad],
            "tied_aliases": [n for n, _ in all_named if n not in unique]}


def pool_rows(toks: list[TokenizedExample], scores: torch.Tensor, losses: torch.Tensor,
              sq_norms: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """data_scores.jsonl rows in POOL order from φ_data [N] and l [N] in pool order. With ‖g_n‖² [N]
    (``--data-score cosine``), "score" (what selection ranks) is the cosine ⟨u, g_n⟩/‖g_n‖ and the rows also
    carry "inner" = ⟨u, g_n⟩ and "grad_norm" = ‖g_n‖."""
    ranked = scores if sq_norms is None else cosine_scores(scores, sq_norms)
    out = []
    for i, t in enumerate(toks):
        row = {"index": t.index, "score": float(ranked[i]), "loss": float(losses[i]), "tokens": t.n_response_tokens,
               "length": len(t.input_ids), "truncated": t.truncated}
        if sq_norms is not None:
            row.update(inner=float(scores[i]), grad_norm=float(sq_norms[i].clamp_min(0).sqrt()))
        out.append(row)
    return out


def write_tensors(out: Path, stats: dict[str, Any], collect: Any = None) -> None:
    """Write φ_param, u, v and G (float32 safetensors) on rank 0. ``collect`` (``--sharding fsdp``: a
    collective every rank calls) turns this rank's rows into whole tensors on rank 0, one file at a time, so
    rank 0 never holds more than one of them whole."""
    files = (("param_scores", "phi", "phi_param = u*G"), ("u", "u", "u"), ("v", "v", "v"), ("grad_sum", "G", "G"))
    for key, stat, what in files:
        tensors = collect(stats[stat]) if collect is not None else stats[stat]
        if dist.is_main():
            save_tensors(out / FILES[key], {n: t.float() for n, t in tensors.items()}, metadata={"what": what})
        del tensors


def write_scores(cfg: ScoreConfig, inp: ScoringInputs, stats: dict[str, Any], rows: dict[str, torch.Tensor],
                 info: dict[str, Any]) -> None:
    """Write the rest of RUN/scores/ (rows, settings, summary; ``write_tensors`` wrote the tensors) and drop
    the progress folder: after that, the folder is complete (the module docstring's output contract)."""
    out = inp.out
    write_jsonl(out / FILES["data_scores"], pool_rows(inp.pool, rows["scores"], rows["losses"], rows.get("sq_norms")))
    save_settings(out, ScoringSettings.from_config(cfg, scored_at(inp.at_theta0)))
    summary = score_summary(cfg, inp, stats, rows, info)
    write_json(out / FILES["summary"], summary)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)  # every output is written: nothing left to resume
    log.info("uᵀG = %.6e  Σφ_param = %.6e  Σφ_data = %.6e  (%d examples, %s, order %d)", summary["uTG"],
             summary["sum_param"], summary["sum_data"], len(inp.pool), cfg.method, cfg.order)


def target_norm_summary(norms: torch.Tensor | None) -> dict[str, Any]:
    """Mean / min / max of ‖g_q‖ over the target set (``--target-gradient normalized`` only)."""
    if norms is None:
        return {}
    return {"target_grad_norm": {"mean": float(norms.mean()), "min": float(norms.min()), "max": float(norms.max())}}


def score_summary(cfg: ScoreConfig, inp: ScoringInputs, stats: dict[str, Any], rows: dict[str, torch.Tensor],
                  info: dict[str, Any]) -> dict[str, Any]:
    """summary.json: the row-column identity uᵀG = Σφ_param = Σφ_data (with --data-params linear, Σφ_data =
    Σ_{j∈R} φ_param = sum_param_rows; always over the INNER scores), the settings, coverage and timings."""
    timings, totals = info["timings"], stats["totals"]
    pool_wall = sum(t["wall_time_s"] for k, t in timings.items() if k.startswith("pool"))
    return {
        "uTG": totals["uTG"], "sum_param": totals["sum_param"],
        "sum_data": float(rows["scores"].sum()),  # Σ ⟨u, g_n⟩ (the INNER scores, whatever --data-score ranks)
        # Σ_n ⟨u_R, g_n⟩ = Σ_{j∈R} φ_param_j: equals sum_param when --data-params all
        "sum_param_rows": totals["sum_param_rows"],
        # c, G, u, v, φ_param (and the u slots' rows under fsdp) as each rank holds them at the end
        "statistics_bytes_per_rank": totals["statistics_bytes_per_rank"],
        "score_tokens": cfg.score_tokens, "data_score": cfg.data_score, "target_gradient": cfg.target_gradient,
        # the preconditioner used (auto resolved by whether c exists) and the one asked for
        "precondition": cfg.precondition, "precondition_requested": info["precondition_requested"],
        "data_params": cfg.data_params,
        **target_norm_summary(stats.get("target_norms")),
        "order": cfg.order, "eta": cfg.eta, "lambda_new": cfg.lambda_new, "lambda_prior": cfg.lambda_prior,
        "tau": cfg.tau, "confidence": cfg.confidence, "prior_normalisation": cfg.prior_normalisation,
        "method": cfg.method, "stats_dtype": cfg.stats_dtype, "scored_at": scored_at(inp.at_theta0),
        "curvature": inp.c_path and portable_path(inp.c_path), "coverage": coverage(inp.model),
        "passes": list(timings), "timings": timings,
        "examples_per_s": len(inp.pool) / pool_wall, "u_term_norms": stats["norms"], "pool_size": len(inp.pool),
        "target_size": len(inp.target), "anchor_indices": [inp.pool[i].index for i in info["anchors"]],
        "skipped": info["skipped"], "mean_pool_loss": float(rows["losses"].mean()), "files": FILES,
        "wall_time_s": time.time() - info["t_start"], "world_size": info["world_size"], "sharding": cfg.sharding,
        "file_meaning": {"param_scores": "phi_param = u*G", "u": "u", "v": "v = lambda_new v_new + lambda_prior "
                         "v_prior", "grad_sum": "G = sum_n g_n over the pool",
                         "data_scores": "phi_data[n] = <u, g_n>" if cfg.data_score == "inner" else
                         "score = <u, g_n> / |g_n| (cosine); inner = <u, g_n>; grad_norm = |g_n|"},
    }
