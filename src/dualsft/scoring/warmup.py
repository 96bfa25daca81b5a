"""`dualsft warmup`: a short full-parameter AdamW run that gives the scoring checkpoint θw and the
diagonal curvature c = Adam's raw exp_avg_sq (docs/method.md §5 step 2).

    dualsft warmup --pool data/pool.jsonl --run-dir runs/demo

Writes RUN/warmup/:
    model/                    θw as an HF folder (save_pretrained, safetensors) with the tokenizer
    exp_avg_sq.safetensors    c: raw Adam exp_avg_sq (NO bias correction), float32, per parameter name
                              (named_parameters, tied weights once)
    warmup_indices.json       {"indices": stable example indices used, "positions": their pool positions}
    summary.json              steps, examples, mean loss per step, wall time (the loop's own: loop_wall_s), fingerprint of θw
    metadata.json
    tensorboard/              with --report-to tensorboard: loss, lr, grad norm, tokens/s per step
``--warmup-ratio 0`` trains nothing and writes only warmup_indices.json/summary.json: `dualsft score` then
scores at θ0, where only --order 1 is available unless --curvature FILE is given.
Defaults follow the release: 10% of the pool, 1 epoch, lr 2e-5, weight decay 0, constant LR, effective
batch 16 (micro-batches + gradient accumulation), loss = mean over the step's examples of l_n.
The training is the full fine-tuning case of the one training loop (``training/loop.py``): constant lr,
no gradient clipping, no autocast, torch's AdamW, and ``chained_epoch_order`` (one generator seeded with
--seed drawing each epoch's permutation), keeping Adam's exp_avg_sq.
Data parallel (``torchrun --nproc_per_node N -m dualsft warmup ...``): each step's examples are sharded
across ranks, every rank divides by the GLOBAL step size, gradients are all-reduced before AdamW, so
every rank holds the same θw; rank 0 writes. ``--sharding fsdp`` (FSDP2): θ, its gradients and AdamW's
moments are sharded across ranks (c too); θw and c are gathered tensor by tensor onto rank 0 to be written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from dualsft import distributed as dist
from dualsft.config import CommonConfig, opt, require
from dualsft.data.formats import TokenizedExample
from dualsft.errors import ConfigError
from dualsft.io import read_json, save_tensors, write_json
from dualsft.models import load_model, load_tokenizer, model_fingerprint
from dualsft.runs import build_metadata, prepare_stage_dir
from dualsft.scoring.data import load_split, sample_positions
from dualsft.training.loop import NEUTRAL_SETTINGS, TrainResult, TrainSettings, chained_epoch_order, train_restricted
from dualsft.training.reporting import REPORT_TO_HELP, RESULT_NEUTRAL, Reporter, ReportTo, make_reporter
from dualsft.training.sharded import load_stage_model, resolve_sharding, training_blocker

log = logging.getLogger(__name__)

HELP = "short full-parameter AdamW warm-up: scoring checkpoint θw and curvature c = Adam exp_avg_sq"


@dataclass(frozen=True)
class WarmupConfig(CommonConfig):
    """Options of `dualsft warmup` (docs/method.md §5 step 2)."""

    pool: str = opt("", "pool data: a file (JSONL/JSON), a saved dataset FOLDER[@split] or "
                        "hf://owner/name[:config][@split], each optionally ?prompt=COL&response=COL")
    warmup_ratio: float = opt(0.1, "fraction of the pool to warm up on (seeded); 0 = score at θ0")
    epochs: int = opt(1, "epochs over the warm-up subset")
    lr: float = opt(2e-5, "AdamW learning rate (constant)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    batch_size: int = opt(16, "effective batch: examples per optimizer step")
    micro_batch_size: int = opt(4, "examples per forward/backward (gradient accumulation fills the batch)")
    report_to: ReportTo = opt("none", REPORT_TO_HELP)
    gradient_checkpointing: bool = opt(False, "recompute each decoder layer's activations in the backward "
                                              "(non-reentrant): less activation memory, the same θw and c")
    sharding: Literal["auto", "none", "fsdp"] = opt("auto", "fsdp: shard θ and AdamW's moments (so c) across the "
                                                    "torchrun processes with PyTorch FSDP2; θw and c are gathered "
                                                    "tensor by tensor onto rank 0 to be written (docs/scaling.md "
                                                    "§4b); none: data parallel; auto (default): fsdp with more than "
                                                    "one process unless --loss-chunk is set")
    loss_chunk: int = opt(0, "LM head + cross-entropy on the response positions only, N at a time, recomputed "
                             "in the backward (no [batch, length, vocab] logits); 0 = full logits")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.warmup_ratio <= 1, "warmup-ratio", self.warmup_ratio, "a fraction of the pool in [0, 1]")
        require(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        require(self.lr > 0, "lr", self.lr, "must be positive")


CONFIG = WarmupConfig
# options that never change θw or c (the training loop's neutral settings the warm-up has, reporting): a rerun
# may change them
NEUTRAL = (RESULT_NEUTRAL, *(f"config.{k}" for k in NEUTRAL_SETTINGS if k in WarmupConfig.__dataclass_fields__))


def check_batch_sizes(batch_size: int, micro_batch_size: int) -> None:
    """The effective batch must be a positive multiple of the micro-batch (gradient accumulation)."""
    if batch_size < 1 or micro_batch_size < 1 or batch_size % micro_batch_size:
        raise ConfigError(f"--batch-size ({batch_size}) must be a positive multiple of --micro-batch-size "
                          f"({micro_batch_size})")


def warmup_settings(cfg: WarmupConfig, progress: bool = True) -> TrainSettings:
    """The warm-up as training-loop settings: full fine-tuning, constant lr, no clipping, no autocast (the
    model's own dtype, as the scores see it), no checkpoints."""
    return TrainSettings(method="full", lr=cfg.lr, weight_decay=cfg.weight_decay, epochs=cfg.epochs,
                         batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size, lr_schedule="constant",
                         warmup_steps=0, max_grad_norm=0.0, seed=cfg.seed, checkpoint_every=0, autocast=False,
                         progress=progress, gradient_checkpointing=cfg.gradient_checkpointing,
                         loss_chunk=cfg.loss_chunk, sharding=cfg.sharding)


def warm_up(model: torch.nn.Module, toks: list[TokenizedExample], pad_token_id: int, cfg: WarmupConfig,
            progress: bool = True, reporter: Reporter | None = None) -> TrainResult:
    """Train ``model`` (θ0 -> θw, in place) on ``toks``; ``result.exp_avg_sq`` is c (docs/method.md §3): raw Adam
    second moments, float32, keyed like ``trainable_params``; ``result.metrics[i]["loss"]`` the step losses.
    ``reporter`` (``reporting.make_reporter``) gets each step's scalars; the caller closes it."""
    check_batch_sizes(cfg.batch_size, cfg.micro_batch_size)
    return train_restricted(model, toks, None, warmup_settings(cfg, progress), pad_token_id,
                            order=chained_epoch_order, keep_exp_avg_sq=True, reporter=reporter)


def main(cfg: WarmupConfig) -> int:
    """Run the warm-up and write RUN/warmup/ (see module docstring)."""
    t0 = time.time()
    check_batch_sizes(cfg.batch_size, cfg.micro_batch_size)  # before anything is written
    ctx = dist.dist_context(cfg.device)
    cfg = replace(cfg, sharding=resolve_sharding(cfg.sharding, training_blocker("full", cfg.loss_chunk)))
    out = Path(cfg.run_dir) / "warmup"
    reporter = make_reporter(cfg.report_to, out / "tensorboard")  # a missing tensorboard fails before any work
    tokenizer = load_tokenizer(cfg.model)
    pool = load_split(cfg.pool, tokenizer, cfg, "pool")
    positions = sample_positions(len(pool), cfg.warmup_ratio, cfg.seed)
    base = load_stage_model(cfg.model, cfg.dtype, cfg.device, "sdpa", cfg.sharding)
    meta = build_metadata("warmup", cfg, model_id=cfg.model, model_fingerprint=model_fingerprint(base),
                          data_files={"pool": cfg.pool})
    if ctx.is_main:  # one writer; the other ranks wait until the folder is ready
        out = prepare_stage_dir(cfg.run_dir, "warmup", meta, cfg.overwrite, ignore=NEUTRAL)
    dist.barrier()
    done = (out / "summary.json").exists() and (cfg.warmup_ratio == 0 or (out / "exp_avg_sq.safetensors").exists())
    dist.barrier()  # every rank has decided before rank 0 writes anything below
    if done:
        log.info("%s is complete for these settings; nothing to do (pass --overwrite to redo it)", out)
        return 0
    indices = [pool[i].index for i in positions]
    if ctx.is_main:
        write_json(out / "warmup_indices.json", {"indices": indices, "positions": positions})
    summary: dict[str, Any] = {"warmup_ratio": cfg.warmup_ratio, "examples": len(positions), "pool_size": len(pool)}
    if not positions:
        log.info("--warmup-ratio 0: no warm-up; `dualsft score` will score at θ0 (first order only, unless "
                 "--curvature FILE is given)")
        if ctx.is_main:
            write_json(out / "summary.json", {**summary, "steps": 0, "theta_w": "theta_0"})
        return 0
    log.info("warm-up on %d of %d pool examples (ratio %g, seed %d)", len(positions), len(pool), cfg.warmup_ratio,
             cfg.seed)
    try:
        result = warm_up(base, [pool[i] for i in positions], tokenizer.pad_token_id, cfg, reporter=reporter)
    finally:
        reporter.close()
    step_losses = [m["loss"] for m in result.metrics]
    model_dir = Path(out) / "model"
    if not ctx.is_main:  # every rank holds the same θw (or, sharded, gave rank 0 its rows); rank 0 writes it
        dist.barrier()
        return 0
    if result.values is not None:  # --sharding fsdp: θw was gathered tensor by tensor onto rank 0
        base = save_gathered_model(cfg, result.values, model_dir)
    else:
        base.save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))
    c = result.exp_avg_sq
    save_tensors(out / "exp_avg_sq.safetensors", c, metadata={"what": "raw Adam exp_avg_sq (no bias correction)"})
    write_json(out / "summary.json", {**summary, "steps": len(step_losses), "step_losses": step_losses,
                                      "theta_w_fingerprint": model_fingerprint(base), "wall_time_s": time.time() - t0,
                                      "loop_wall_s": result.wall_time_s})
    log.info("wrote θw to %s and c (%d tensors) to %s", model_dir, len(c), out / "exp_avg_sq.safetensors")
    dist.barrier()
    return 0


def save_gathered_model(cfg: WarmupConfig, values: dict[str, torch.Tensor], model_dir: Path) -> torch.nn.Module:
    """Write θw from whole tensors gathered off FSDP shards (rank 0) as an HF folder: the base model's config
    and the values as model.safetensors (named_parameters' names, tied weights once, as transformers saves
    them); the values are released, and the folder is loaded back (returned, for the fingerprint), so at
    most one whole copy of the weights exists at a time."""
    from transformers import AutoConfig

    from dualsft.models import resolve_model_path

    model_dir.mkdir(parents=True, exist_ok=True)
    AutoConfig.from_pretrained(resolve_model_path(cfg.model)).save_pretrained(str(model_dir))
    save_tensors(model_dir / "model.safetensors", values, metadata={"format": "pt"})
    values.clear()
    return load_model(str(model_dir), cfg.dtype, "cpu", attn_implementation="sdpa")


def warmup_state(run_dir: str) -> dict[str, Any] | None:
    """What `dualsft score` needs from RUN/warmup: None if absent, else its summary plus paths."""
    d = Path(run_dir) / "warmup"
    if not (d / "summary.json").exists():
        return None
    s = read_json(d / "summary.json")
    has_model = (d / "model" / "config.json").exists()
    return {**s, "dir": str(d), "model_dir": str(d / "model") if has_model else None,
            "curvature": str(d / "exp_avg_sq.safetensors") if (d / "exp_avg_sq.safetensors").exists() else None,
            "metadata": read_json(d / "metadata.json") if (d / "metadata.json").exists() else {}}
