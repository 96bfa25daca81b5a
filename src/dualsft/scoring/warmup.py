"""`dualsft warmup`: a short full-parameter AdamW run that gives the scoring checkpoint θw and the
diagonal curvature c = Adam's raw exp_avg_sq (METHOD.md §5 step 2).

    dualsft warmup --pool data/pool.jsonl --run-dir runs/demo

Writes RUN/warmup/:
    model/                    θw as an HF folder (save_pretrained, safetensors) with the tokenizer
    exp_avg_sq.safetensors    c: raw Adam exp_avg_sq (NO bias correction), float32, per parameter name
                              (named_parameters, tied weights once)
    warmup_indices.json       {"indices": stable example indices used, "positions": their pool positions}
    summary.json              steps, examples, mean loss per step, wall time, fingerprint of θw
    metadata.json
``--warmup-ratio 0`` trains nothing and writes only warmup_indices.json/summary.json: `dualsft score` then
scores at θ0, where only --order 1 is available unless --curvature FILE is given.
Defaults follow the release: 10% of the pool, 1 epoch, lr 2e-5, weight decay 0, constant LR, effective
batch 16 (micro-batches + gradient accumulation), loss = mean over the step's examples of l_n.
Data parallel (``torchrun --nproc_per_node N -m dualsft warmup ...``): each step's examples are sharded
across ranks, every rank divides by the GLOBAL step size, gradients are all-reduced before AdamW, so
every rank holds the same θw; rank 0 writes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dualsft import distributed as dist
from dualsft.config import CommonConfig, opt, require
from dualsft.data.formats import TokenizedExample, batches
from dualsft.errors import ConfigError
from dualsft.io import read_json, save_tensors, write_json
from dualsft.losses import per_example_loss
from dualsft.models import load_model, load_tokenizer, model_fingerprint
from dualsft.runs import build_metadata, prepare_stage_dir
from dualsft.scoring.data import load_split, sample_positions
from dualsft.scoring.stats import check_finite, model_inputs, trainable_params

log = logging.getLogger(__name__)

HELP = "short full-parameter AdamW warm-up: scoring checkpoint θw and curvature c = Adam exp_avg_sq"


@dataclass(frozen=True)
class WarmupConfig(CommonConfig):
    """Options of `dualsft warmup` (METHOD.md §5 step 2)."""

    pool: str = opt("", "pool data file (JSONL/JSON) of instruction/response pairs")
    warmup_ratio: float = opt(0.1, "fraction of the pool to warm up on (seeded); 0 = score at θ0")
    epochs: int = opt(1, "epochs over the warm-up subset")
    lr: float = opt(2e-5, "AdamW learning rate (constant)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    batch_size: int = opt(16, "effective batch: examples per optimizer step")
    micro_batch_size: int = opt(4, "examples per forward/backward (gradient accumulation fills the batch)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.warmup_ratio <= 1, "warmup-ratio", self.warmup_ratio, "a fraction of the pool in [0, 1]")
        require(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        require(self.lr > 0, "lr", self.lr, "must be positive")


CONFIG = WarmupConfig


def step_groups(micro: list[dict[str, torch.Tensor]], per_step: int) -> list[list[dict[str, torch.Tensor]]]:
    """Group micro-batches into optimizer steps of ``per_step`` micro-batches (last group may be short)."""
    return [micro[i : i + per_step] for i in range(0, len(micro), per_step)]


def check_batch_sizes(batch_size: int, micro_batch_size: int) -> None:
    """The effective batch must be a positive multiple of the micro-batch (gradient accumulation)."""
    if batch_size < 1 or micro_batch_size < 1 or batch_size % micro_batch_size:
        raise ConfigError(f"--batch-size ({batch_size}) must be a positive multiple of --micro-batch-size "
                          f"({micro_batch_size})")


def train_warmup(model: torch.nn.Module, toks: list[TokenizedExample], pad_id: int, epochs: int, lr: float,
                 weight_decay: float, batch_size: int, micro_batch_size: int, seed: int,
                 show_progress: bool = True) -> tuple[torch.optim.AdamW, list[float]]:
    """Full-parameter AdamW on ``toks``: returns (optimizer, mean loss per step).

    Each epoch visits the examples in a seeded random order. A step's loss is the mean over its
    examples of l_n (token-mean response NLL), so the last, shorter step is weighted like the others.
    """
    check_batch_sizes(batch_size, micro_batch_size)
    params = trainable_params(model)
    opt_ = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
    device = next(iter(params.values())).device
    g = torch.Generator().manual_seed(seed)
    step_losses: list[float] = []
    model.train()
    bar = tqdm(total=epochs * len(toks), unit="ex", desc="warmup", disable=not show_progress or not dist.is_main())
    for _ in range(epochs):
        order = torch.randperm(len(toks), generator=g).tolist()
        for start in range(0, len(order), batch_size):
            step = order[start:start + batch_size]
            mine = [step[i] for i in dist.shard(len(step), dist.rank(), dist.world_size())]
            group = batches([toks[i] for i in mine], micro_batch_size, pad_id)  # this rank's micro-batches
            n_step = len(step)  # GLOBAL: every rank divides by the whole step's size
            total = 0.0
            for b in group:
                losses = per_example_loss(model, model_inputs(b, device))
                check_finite(losses, b)
                (losses.sum() / n_step).backward()
                total += float(losses.detach().sum())
            dist.all_reduce_grads_(params)  # the step's summed gradient on every rank (manual DDP)
            opt_.step()
            opt_.zero_grad(set_to_none=True)
            (total,) = dist.all_reduce_sum([total])
            step_losses.append(total / n_step)
            bar.update(n_step)
            bar.set_postfix(loss=f"{step_losses[-1]:.4f}")
    bar.close()
    model.eval()
    return opt_, step_losses


def exp_avg_sq(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """c = raw Adam second moments (no bias correction), float32, keyed like trainable_params."""
    out = {}
    for name, p in trainable_params(model).items():
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" in state:
            out[name] = state["exp_avg_sq"].detach().float().cpu()
    return out


def main(cfg: WarmupConfig) -> int:
    """Run the warm-up and write RUN/warmup/ (see module docstring)."""
    t0 = time.time()
    check_batch_sizes(cfg.batch_size, cfg.micro_batch_size)  # before anything is written
    ctx = dist.dist_context(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    pool = load_split(cfg.pool, tokenizer, cfg, "pool")
    positions = sample_positions(len(pool), cfg.warmup_ratio, cfg.seed)
    base = load_model(cfg.model, cfg.dtype, dist.rank_device(cfg.device), attn_implementation="sdpa")
    meta = build_metadata("warmup", cfg, model_id=cfg.model, model_fingerprint=model_fingerprint(base),
                          data_files={"pool": cfg.pool})
    out = Path(cfg.run_dir) / "warmup"
    if ctx.is_main:  # one writer; the other ranks wait until the folder is ready
        out = prepare_stage_dir(cfg.run_dir, "warmup", meta, cfg.overwrite)
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
    optimizer, step_losses = train_warmup(base, [pool[i] for i in positions], tokenizer.pad_token_id, cfg.epochs,
                                          cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.micro_batch_size, cfg.seed)
    model_dir = Path(out) / "model"
    if not ctx.is_main:  # every rank holds the same θw; rank 0 writes it
        dist.barrier()
        return 0
    base.save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))
    c = exp_avg_sq(base, optimizer)
    save_tensors(out / "exp_avg_sq.safetensors", c, metadata={"what": "raw Adam exp_avg_sq (no bias correction)"})
    write_json(out / "summary.json", {**summary, "steps": len(step_losses), "step_losses": step_losses,
                                      "theta_w_fingerprint": model_fingerprint(base), "wall_time_s": time.time() - t0})
    log.info("wrote θw to %s and c (%d tensors) to %s", model_dir, len(c), out / "exp_avg_sq.safetensors")
    dist.barrier()
    return 0


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
