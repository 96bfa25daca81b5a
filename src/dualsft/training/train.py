"""`dualsft train`: restricted fine-tuning FROM THE BASE MODEL θ0 (docs/method.md §5 step 5, §7).

    dualsft train --run-dir runs/demo                       # subset + mask from `dualsft select`, sparse AdamW
    dualsft train --run-dir runs/demo --mask none           # DualSFT-Data: the subset, every weight (full FT)
    dualsft train --run-dir runs/demo --data all            # DualSFT-Param: the whole pool, the mask
    dualsft train --run-dir runs/demo --method lora         # LoRA baseline (r=16, alpha=32, lr 2e-4)

Writes RUN/train/ (or --out): delta.safetensors (LoRA: adapter/), adapter.json, metrics.jsonl,
loss_curve.png, metadata.json; checkpoints/ while running (a rerun of the same command resumes);
tensorboard/ with --report-to tensorboard (`tensorboard --logdir RUN`).

Data parallel on N processes (each step's examples sharded; only the selected entries' gradients are
all-reduced for sparse training; rank 0 writes everything):
    torchrun --standalone --nproc_per_node N -m dualsft train --run-dir runs/demo
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from dualsft import distributed as dist
from dualsft.config import CommonConfig, opt, require
from dualsft.errors import ArtifactError
from dualsft.io import read_json, write_json, write_jsonl
from dualsft.runs import build_metadata, portable_config, prepare_stage_dir
from dualsft.training.checkpoint import clear_checkpoints
from dualsft.training.delta import DELTA_FILE, LORA_DIR, delta_from_values, extract_delta, save_delta
from dualsft.training.loop import NEUTRAL_SETTINGS, TrainResult, TrainSettings, resolved_lr, train_restricted
from dualsft.training.reporting import REPORT_TO_HELP, ReportTo, make_reporter
from dualsft.training.reporting import RESULT_NEUTRAL as REPORTING
from dualsft.training.sharded import load_stage_model, resolve_sharding, training_blocker

HELP = "fine-tune the base model on the selected subset, updating only the selected parameter entries"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig(TrainSettings, CommonConfig):
    """Options of `dualsft train` (the hyperparameters are ``TrainSettings``'s)."""

    subset: str | None = opt(None, "training examples; default RUN/selection/subset.jsonl")
    mask: str | None = opt(None, "mask file; default RUN/selection/mask.safetensors; 'none' = full fine-tuning")
    data: Literal["subset", "all"] = opt("subset", "subset: the selected examples; all: the whole pool "
                                         "(--train-file, default RUN/data/pool.jsonl)")
    train_file: str | None = opt(None, "train on this data instead (any supported schema): a file, a saved dataset "
                                       "FOLDER[@split] or hf://owner/name[:config][@split] (+ ?prompt=COL&response=COL)")
    out: str | None = opt(None, "output folder; default RUN/train")
    keep_checkpoints: bool = opt(False, "keep checkpoints/ after a successful run")
    attn_implementation: str = opt("sdpa", "attention kernel for training: sdpa or eager")
    report_to: ReportTo = opt("none", REPORT_TO_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lr is None or self.lr > 0, "lr", self.lr, "must be positive")  # the rest: loop.check_settings


CONFIG = TrainConfig
# Options that do not change the trained weights: a rerun that differs only in these still resumes.
RESULT_NEUTRAL = (*(f"config.{k}" for k in NEUTRAL_SETTINGS), "config.overwrite", "config.keep_checkpoints",
                  REPORTING)


def resolve_paths(cfg: TrainConfig) -> tuple[str | Path, Path | None, Path]:
    """(training data file or source spec, mask file or None, output folder) from the options and the run
    folder."""
    run = Path(cfg.run_dir)
    data: str | Path
    if cfg.train_file:
        from dualsft.data.sources import parse_source

        data = parse_source(cfg.train_file).spec  # a missing file or a bad spec fails here, before the model loads
    elif cfg.data == "all":
        data = run / "data" / "pool.jsonl"
    else:
        data = Path(cfg.subset) if cfg.subset else run / "selection" / "subset.jsonl"
    if isinstance(data, Path) and not data.exists():
        hint = "run `dualsft select` first or pass --subset" if cfg.data == "subset" else "pass --train-file"
        raise ArtifactError(f"training data {data} does not exist: {hint}")
    mask: Path | None = None
    no_mask = cfg.method in ("full", "lora") or (cfg.mask or "").lower() == "none"
    if cfg.method in ("full", "lora") and cfg.mask and cfg.mask.lower() != "none":
        log.warning("--method %s trains without a mask; ignoring --mask %s", cfg.method, cfg.mask)
    if not no_mask:
        mask = Path(cfg.mask) if cfg.mask else run / "selection" / "mask.safetensors"
        if not mask.exists():
            raise ArtifactError(f"mask {mask} does not exist: run `dualsft select` first, pass --mask FILE, "
                                "or --mask none for full fine-tuning")
    return data, mask, Path(cfg.out) if cfg.out else run / "train"


def resolve_config(cfg: TrainConfig, data: str | Path, mask: Path | None) -> TrainConfig:
    """A resolved copy: concrete paths, the method (no mask -> full), the learning rate."""
    method = cfg.method
    if mask is None and method in ("sparse", "dense-masked"):
        log.info("--mask none: training every weight (--method full)")
        method = "full"
    resolved = dataclasses.replace(cfg, method=method, train_file=str(data), mask=str(mask) if mask else "none",
                                   subset=None)
    return dataclasses.replace(resolved, lr=resolved_lr(resolved))


def mask_summary(model: torch.nn.Module, mask: dict[str, torch.Tensor] | None, method: str) -> dict:
    """k, d and the fraction trained; per-tensor counts for the mask."""
    d = sum(p.numel() for _, p in model.named_parameters())
    if mask is None:
        return {"kind": method, "d": d}
    k = sum(v.numel() for v in mask.values())
    return {"kind": "mask", "k": k, "d": d, "fraction": k / d, "tensors_selected": len(mask),
            "tensors_frozen": sum(1 for n, _ in model.named_parameters() if n not in mask)}


def save_loss_curve(path: Path, metrics: list[dict], title: str) -> None:
    """Loss per optimizer step as a PNG (Agg backend; atomic rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=1.2, marker="o" if len(metrics) <= 40 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean response-token NLL)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def save_artifacts(out: Path, result: TrainResult, mask: dict[str, torch.Tensor] | None, cfg: TrainConfig,
                   base: dict, summary: dict, weights_dtype: str) -> None:
    """delta.safetensors (or adapter/), metrics.jsonl, loss_curve.png, then adapter.json LAST (it marks success)."""
    if result.method == "lora":
        tmp = out / f".{LORA_DIR}.tmp"
        result.model.save_pretrained(str(tmp))
        if (out / LORA_DIR).exists():
            import shutil

            shutil.rmtree(out / LORA_DIR)
        os.replace(tmp, out / LORA_DIR)
        artifact = LORA_DIR
    else:
        if result.values is not None:  # --sharding fsdp: the model is sharded; its trained values were gathered
            shapes = {n: tuple(p.shape) for n, p in result.model.named_parameters()}
            delta = delta_from_values(result.values, mask if result.method == "sparse" else None, shapes,
                                      base["id"], base["fingerprint"])
        else:
            delta = extract_delta(result.model, mask if result.method in ("sparse", "dense-masked") else None,
                                  result.trainable, base["id"], base["fingerprint"])
        save_delta(out / DELTA_FILE, delta)
        artifact = DELTA_FILE
    write_jsonl(out / "metrics.jsonl", result.metrics)
    save_loss_curve(out / "loss_curve.png", result.metrics, f"dualsft train ({result.method})")
    write_json(out / "adapter.json", {
        "format": "dualsft-train-v1", "complete": True, "artifact": artifact, "method": result.method,
        "base_model": base, "weights_dtype": weights_dtype, "mask": summary,
        "training": portable_config(dataclasses.asdict(cfg)),
        "result": {"steps": result.steps, "tokens": result.tokens, "final_loss": result.final_loss,
                   "wall_time_s": round(result.wall_time_s, 2), "trainable_entries": result.trainable_entries,
                   "optimizer_state_bytes": result.state_bytes, "world_size": dist.world_size()},
    })


def main(cfg: TrainConfig) -> int:
    """Run the stage; returns 0 on success."""
    from dualsft.data.formats import load_examples, tokenize_examples
    from dualsft.models import load_tokenizer, model_fingerprint
    from dualsft.selection.mask import check_mask_matches, compact_indices, load_mask

    ctx = dist.dist_context(cfg.device)
    cfg = dataclasses.replace(cfg, sharding=resolve_sharding(cfg.sharding, training_blocker(cfg.method, cfg.loss_chunk)))
    data_path, mask_path, out = resolve_paths(cfg)
    reporter = make_reporter(cfg.report_to, out / "tensorboard")  # a missing tensorboard fails before any work
    rcfg = resolve_config(cfg, data_path, mask_path)
    model = load_stage_model(cfg.model, cfg.dtype, cfg.device, cfg.attn_implementation, cfg.sharding)
    tok = load_tokenizer(cfg.model)
    base = {"id": cfg.model, "fingerprint": model_fingerprint(model)}
    mask = None
    if mask_path is not None:
        mask, shapes = load_mask(mask_path)
        check_mask_matches(model, shapes, str(mask_path))
        numel = {n: p.numel() for n, p in model.named_parameters()}
        mask = {n: compact_indices(v, numel[n]) for n, v in mask.items()}  # int32: the optimizer uses these as is
    files = {"train": data_path, **({"mask": mask_path} if mask_path else {})}
    meta = build_metadata("train", rcfg, cfg.model, base["fingerprint"], files)
    if ctx.is_main:  # one writer; the others wait until the folder is ready
        out = prepare_stage_dir(out.parent, out.name, meta, overwrite=cfg.overwrite, ignore=RESULT_NEUTRAL)
        if cfg.overwrite:
            clear_checkpoints(out / "checkpoints")  # --overwrite: start over, never resume
    dist.barrier()
    if not cfg.overwrite and (out / "adapter.json").exists() and read_json(out / "adapter.json").get("complete"):
        log.info("%s already holds a finished run with these settings; pass --overwrite to retrain", out)
        return 0
    toks = tokenize_examples(load_examples(data_path), tok, cfg.template, cfg.max_length, cfg.drop_empty,
                             source=str(data_path), assistant_turns=cfg.assistant_turns)
    summary = mask_summary(model, mask, rcfg.method)
    log.info("training %s on %d examples (%s)", rcfg.method, len(toks),
             f"k={summary['k']} of d={summary['d']}" if "k" in summary else f"d={summary['d']}")
    weights_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    try:
        result = train_restricted(model, toks, mask, rcfg, tok.pad_token_id, checkpoint_dir=out / "checkpoints",
                                  reporter=reporter)
    finally:
        reporter.close()
    if ctx.is_main:
        save_artifacts(out, result, mask, rcfg, base, summary, weights_dtype)
        if not cfg.keep_checkpoints:
            clear_checkpoints(out / "checkpoints")
    dist.barrier()
    log.info("wrote %s (final loss %.4f, %d steps, %.1f s)", out, result.final_loss, result.steps, result.wall_time_s)
    return 0
