"""The explicit training loop shared by every method: sparse (DualSFT), dense-masked (the authors'
approach, the reference), full fine-tuning, LoRA, and the warm-up (``scoring/warmup.py``: the full
fine-tuning case at a constant lr without clipping, keeping Adam's exp_avg_sq as the curvature c).

Public API (stable; the comparison harness calls it for baselines):
    TrainSettings                    hyperparameters (frozen dataclass; ``TrainConfig`` of the CLI is one)
    train_restricted(model, examples, mask, settings, pad_token_id, ...) -> TrainResult
    TrainResult                      trained model, per-step metrics, counts, optimizer memory
    lr_at(step, total, settings)     the learning-rate schedule
    epoch_order, chained_epoch_order the two data orders (an ``EpochOrder``: (N, seed, epoch) -> permutation)
    step_examples(n, step, settings) which example positions an optimizer step uses
    rank_examples(positions)         this rank's share of a step's positions (data parallelism)

One optimizer step = ``batch_size`` examples (B) in micro-batches of ``micro_batch_size``; the loss of a
step is the MEAN over its examples of l(z) (token-mean NLL over response tokens, docs/method.md §2), so
accumulation gives the same gradient as one big batch. Data order: a seeded permutation per epoch that
depends only on (N, seed, epoch), so the position in the data is just the step count and a checkpoint
needs no iterator state.

Data parallelism (``torchrun --nproc_per_node N -m dualsft train``): each step's B examples are split
into N contiguous shards (``rank_examples``); every rank divides its summed loss by the GLOBAL B, the
optimizer's gradient accumulators are summed across ranks (``all_reduce_grads``: for sparse training
only the [k_p] selected entries travel), and every rank applies the same update, so N ranks equal one
rank up to float summation order. Only rank 0 shows progress and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from dualsft import distributed as dist
from dualsft.data.formats import TokenizedExample, collate
from dualsft.errors import ConfigError, NonFiniteLossError
from dualsft.losses import training_loss
from dualsft.models import gradient_checkpointing
from dualsft.training.checkpoint import load_checkpoint, save_checkpoint
from dualsft.training.optim import AdamWHyper, DenseAdamW, SparseAdamW, Updater
from dualsft.training.reporting import NullReporter, Reporter, scalars_of
from dualsft.training.sharded import resolve_sharding, training_blocker

log = logging.getLogger(__name__)

Method = Literal["sparse", "dense-masked", "full", "lora"]
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
EpochOrder = Callable[[int, int, int], list[int]]  # (N, seed, epoch) -> a permutation of 0..N-1
DEFAULT_LR = {"sparse": 2e-5, "dense-masked": 2e-5, "full": 2e-5, "lora": 2e-4}
# TrainSettings fields that never change the trained weights: a checkpoint or a stage folder made under other
# values of these still resumes (stages ignore them as "config.<name>" in their metadata comparison); sharding
# and loss_chunk change only where values live or how the logits are cut (float summation order, as the world
# size does)
NEUTRAL_SETTINGS = ("progress", "checkpoint_every", "gradient_checkpointing", "sharding", "loss_chunk")


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of restricted fine-tuning (defaults: docs/method.md §5 step 5)."""

    method: Method = field(default="sparse", metadata={"help": "sparse: state only for the mask's entries "
                           "(DualSFT); dense-masked: dense AdamW with gradient masking (the authors' way, the "
                           "reference); full: full fine-tuning (ignores the mask); lora: peft LoRA (ignores the mask)"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate; default 2e-5 (2e-4 for lora)"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled AdamW weight decay (selected entries only)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    epochs: int = field(default=3, metadata={"help": "passes over the training examples"})
    batch_size: int = field(default=64, metadata={"help": "effective batch: examples per optimizer step"})
    micro_batch_size: int = field(default=8, metadata={"help": "examples per forward/backward (accumulated)"})
    lr_schedule: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata={"help": "learning-rate schedule after warm-up (decays to 0 at the end)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps (lr = peak·(s+1)/warmup)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm (over the trainable "
                                 "entries only) to this; 0 disables"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: epochs decide)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order, dropout and LoRA init"})
    checkpoint_every: int = field(default=50, metadata={"help": "save a resumable checkpoint every N optimizer "
                                  "steps (0: never)"})
    autocast: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA (ignored on CPU)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder layer's "
                                         "activations in the backward (non-reentrant): less activation memory, "
                                         "about one more forward of compute, the same gradients"})
    sharding: Literal["auto", "none", "fsdp"] = field(default="auto", metadata={"help": "auto: fsdp under torchrun "
                                              "with more than one process for --method sparse and full, else none; "
                                              "fsdp: shard the weights across "
                                              "the torchrun processes with PyTorch FSDP2 (fully_shard per decoder "
                                              "layer); --method sparse keeps optimizer state only for the mask's "
                                              "entries in the rank's own rows, --method full shards AdamW's moments "
                                              "like the weights (docs/scaling.md §4b); none: every rank holds the "
                                              "whole model (data parallel)"})
    loss_chunk: int = field(default=0, metadata={"help": "compute the LM head and cross-entropy on the response "
                            "positions only, N positions at a time, recomputing each chunk's logits in the "
                            "backward (never the [batch, length, vocab] logits); 0 = the full logits"})


@dataclass
class TrainResult:
    """What ``train_restricted`` returns.

    Attributes:
        model: the trained model (a peft model for LoRA), hooks removed, eval mode.
        method: the method used; trainable: names of parameters that were trained.
        metrics: one dict per optimizer step (step, epoch, loss, lr, grad_norm, tokens, examples, time).
        steps / total_steps: steps done so far / planned; completed: steps == total_steps.
        tokens: non-padding tokens processed; trainable_entries: d for dense methods, k for sparse.
        state_bytes: analytic optimizer memory by kind (bytes).
        exp_avg_sq: {name: Adam's raw second moment, float32, CPU} of every tensor the optimizer stepped
            (sparse: the [k_p] selected entries), when ``train_restricted(keep_exp_avg_sq=True)``; else None.
        values: --sharding fsdp: the trained values (the model itself stays sharded, FSDP2 DTensor
            parameters): sparse, {name: [k_p] of the whole mask} on every rank; full, {name: whole tensor}
            on rank 0 ({} elsewhere); else None (read the model).
    """

    model: torch.nn.Module
    method: str
    trainable: list[str]
    metrics: list[dict]
    steps: int
    total_steps: int
    tokens: int
    wall_time_s: float
    trainable_entries: int
    state_bytes: dict[str, int]
    exp_avg_sq: dict[str, torch.Tensor] | None = None
    values: dict[str, torch.Tensor] | None = None

    @property
    def completed(self) -> bool:
        return self.steps >= self.total_steps

    @property
    def final_loss(self) -> float | None:
        return self.metrics[-1]["loss"] if self.metrics else None


def resolved_lr(settings: TrainSettings) -> float:
    """The peak learning rate: the user's, else the method's default."""
    return settings.lr if settings.lr is not None else DEFAULT_LR[settings.method]


def steps_per_epoch(n: int, settings: TrainSettings) -> int:
    """ceil(N / B): the last step of an epoch may hold fewer examples."""
    return math.ceil(n / settings.batch_size)


def total_steps(n: int, settings: TrainSettings) -> int:
    """Optimizer steps of the whole run (``max_steps`` overrides ``epochs`` when > 0)."""
    return settings.max_steps if settings.max_steps > 0 else settings.epochs * steps_per_epoch(n, settings)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation of 0..N-1 for one epoch, from its own generator (independent of any global RNG)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def chained_epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The warm-up's order: ONE generator seeded with ``seed`` draws a permutation of 0..N-1 per epoch, and
    epoch e is its (e+1)-th draw. Recomputed from the seed, so it is still a function of (N, seed, epoch)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epoch):
        torch.randperm(n, generator=g)  # advance the generator past the earlier epochs
    return torch.randperm(n, generator=g).tolist()


def step_examples(n: int, step: int, settings: TrainSettings, order: EpochOrder = epoch_order) -> list[int]:
    """Positions (into the examples list) used by 0-based optimizer step ``step``."""
    spe = steps_per_epoch(n, settings)
    epoch, j = divmod(step, spe)
    return order(n, settings.seed, epoch)[j * settings.batch_size:(j + 1) * settings.batch_size]


def rank_examples(positions: list[int]) -> list[int]:
    """This rank's contiguous share of one step's example positions (all of them in one process)."""
    return [positions[i] for i in dist.shard(len(positions), dist.rank(), dist.world_size())]


def lr_at(step: int, total: int, settings: TrainSettings) -> float:
    """Learning rate of 0-based step ``step``: linear warm-up, then constant / linear / cosine decay to 0."""
    peak, w = resolved_lr(settings), settings.warmup_steps
    if step < w:
        return peak * (step + 1) / w
    if settings.lr_schedule == "constant":
        return peak
    progress = (step - w) / max(1, total - w)
    if settings.lr_schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def check_settings(settings: TrainSettings) -> None:
    """Refuse unusable values with the offending value and what to do."""
    if settings.batch_size < 1 or settings.micro_batch_size < 1:
        raise ConfigError(f"--batch-size ({settings.batch_size}) and --micro-batch-size "
                          f"({settings.micro_batch_size}) must be at least 1")
    if settings.epochs < 1 and settings.max_steps <= 0:
        raise ConfigError(f"--epochs must be at least 1 (got {settings.epochs}) unless --max-steps is set")
    if settings.method not in DEFAULT_LR:
        raise ConfigError(f"unknown --method {settings.method!r}; use one of {sorted(DEFAULT_LR)}")
    if settings.loss_chunk < 0:
        raise ConfigError(f"--loss-chunk must be >= 0 (0 = full logits), got {settings.loss_chunk}")


def build_updater(model: torch.nn.Module, mask: dict[str, torch.Tensor] | None,
                  settings: TrainSettings) -> tuple[torch.nn.Module, Updater, list[str]]:
    """Prepare the model for the method and build its optimizer. Returns (model, updater, trained names).

    LoRA returns a NEW (peft) model object wrapping ``model``.
    """
    hp = AdamWHyper(resolved_lr(settings), (settings.adam_beta1, settings.adam_beta2), settings.adam_eps,
                    settings.weight_decay)
    m = settings.method
    if m in ("sparse", "dense-masked") and mask is None:
        raise ConfigError(f"--method {m} needs a mask; pass --mask or use --method full")
    if m == "sparse":
        if settings.sharding == "fsdp":
            from dualsft.training.sharded import ShardedSparseAdamW, shard_model

            model = shard_model(model)
            opt = ShardedSparseAdamW(model.named_parameters(), mask, **asdict(hp))
            return model, opt, [n for n, _ in opt.named]
        opt = SparseAdamW(model.named_parameters(), mask, **asdict(hp))
        return model, opt, [n for n, _ in opt.named]
    if m == "lora":
        from dualsft.training.lora import wrap_lora

        torch.manual_seed(settings.seed)  # LoRA A init is random: same seed, same start (resume relies on it)
        model = wrap_lora(model, settings.lora_r, settings.lora_alpha, settings.lora_dropout)
    else:
        for _, p in model.named_parameters():
            p.requires_grad_(True)
        if settings.sharding == "fsdp":  # full fine-tuning / the warm-up on FSDP2 shards
            from dualsft.training.sharded import ShardedDenseAdamW, shard_model

            model = shard_model(model)
            opt = ShardedDenseAdamW(model.named_parameters(), hp)
            return model, opt, [n for n, _ in opt.named]
    opt = DenseAdamW(model.named_parameters(), hp, indices=mask if m == "dense-masked" else None)
    return model, opt, [n for n, _ in opt.named]


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def accumulate_grads(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], n_examples: int,
             loss_fn: LossFn, autocast: bool) -> float:
    """Forward/backward every micro-batch with loss Σ l_n / n_examples, so the accumulated gradient is that
    of the step's mean loss. Returns the mean loss. Raises NonFiniteLossError naming the examples."""
    device = next(p for p in model.parameters()).device
    total = 0.0
    for mb in micro_batches:
        batch = _to_device(mb, device)
        # "scale" 0 marks a padding micro-batch (pad_micro_batches): it runs forward and backward, adds nothing
        scale = float(batch.pop("scale")) if "scale" in batch else 1.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
            losses = loss_fn(model, batch)  # [b] per-example l_n
        bad = ~torch.isfinite(losses.detach())
        if bad.any():
            idx = mb["index"][bad.cpu()].tolist()
            raise NonFiniteLossError(f"non-finite training loss for example index(es) {idx}; check those examples "
                                     "or lower --lr", idx)
        (losses.sum() * scale / n_examples).backward()
        total += scale * float(losses.detach().sum())
    return total / n_examples


def pad_micro_batches(mbs: list[dict[str, torch.Tensor]], n_step: int, micro: int,
                      filler: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """FSDP runs collectives inside every forward and backward, so every rank must run as many micro-batches:
    append copies of ``filler`` (one collated example) with "scale" 0 up to the most any rank has for a step
    of ``n_step`` examples in micro-batches of ``micro`` (they add exactly nothing to loss or gradients)."""
    most = max(math.ceil(len(dist.shard(n_step, r, dist.world_size())) / micro) for r in range(dist.world_size()))
    return mbs + [{**filler, "scale": torch.zeros(())} for _ in range(most - len(mbs))]


def train_restricted(model: torch.nn.Module, examples: Sequence[TokenizedExample], mask: dict[str, torch.Tensor] | None,
                     settings: TrainSettings, pad_token_id: int, loss_fn: LossFn | None = None,
                     checkpoint_dir: str | Path | None = None, stop_after_steps: int | None = None,
                     order: EpochOrder = epoch_order, keep_exp_avg_sq: bool = False,
                     reporter: Reporter | None = None) -> TrainResult:
    """Fine-tune ``model`` (θ0) on ``examples``, updating only the entries of ``mask`` (sparse /
    dense-masked) or every weight (full) or LoRA adapters (lora).

    Args:
        model: base causal LM, already on its device/dtype (modified in place; LoRA wraps it).
        examples: tokenised training examples (their ``index`` is reported on a non-finite loss).
        mask: {name: sorted flat indices [k_p]} (``dualsft.selection.mask.load_mask``) or None.
        settings: hyperparameters (a ``TrainConfig`` works too).
        pad_token_id: used to pad micro-batches.
        loss_fn: (model, batch) -> per-example losses [B] (default: response-token mean NLL,
            ``losses.training_loss(settings.loss_chunk)``).
        checkpoint_dir: where to save/resume checkpoints (every ``settings.checkpoint_every`` steps); if it
            holds one, training resumes from it and ends exactly where an uninterrupted run would.
        stop_after_steps: leave after this many steps in THIS call (time-sliced jobs; tests of resume).
        order: the data order per epoch (a resumed run must use the same one).
        keep_exp_avg_sq: hand back Adam's raw second moments in ``TrainResult.exp_avg_sq`` (the warm-up's
            curvature c, docs/method.md §3); off by default, since a float32 CPU copy of d numbers is costly.
        reporter: gets each step's ``reporting.scalars_of(metrics row)`` (loss, lr, grad norm, tokens/s);
            the caller opens and closes it (``reporting.make_reporter``). None: no reporting.
    Returns:
        TrainResult (``completed`` False if stopped early).
    """
    check_settings(settings)
    # "auto" -> none | fsdp; an unusable explicit value (or an unknown one) raises here
    settings = replace(settings, sharding=resolve_sharding(settings.sharding,
                                                           training_blocker(settings.method, settings.loss_chunk)))
    if not examples:
        raise ConfigError("no training examples")
    loss_fn = loss_fn if loss_fn is not None else training_loss(settings.loss_chunk)
    n = len(examples)
    total = total_steps(n, settings)
    orig_flags = {n_: p.requires_grad for n_, p in model.named_parameters()}
    torch.manual_seed(settings.seed)
    model, updater, trained = build_updater(model, mask, settings)
    # data parallelism: every rank must train the same entries on the same examples
    dist.check_same([n, *_mask_checksum(mask)], "the training examples and the mask (count, k, index checksum)")
    model.train()
    state = {"step": 0, "tokens": 0, "elapsed": 0.0, "metrics": []}
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, updater, _fingerprint_settings(settings)) or state
        if state["step"]:
            log.info("resumed from checkpoint at step %d of %d", state["step"], total)
    t_start = time.time() - state["elapsed"]
    bar = _progress(settings.progress and dist.is_main(), total, state["step"])
    reporter = reporter if reporter is not None else NullReporter()
    recompute = contextlib.ExitStack()  # --gradient-checkpointing: on for this loop only
    recompute.enter_context(gradient_checkpointing(model, settings.gradient_checkpointing))
    try:
        done_here = 0
        while state["step"] < total and (stop_after_steps is None or done_here < stop_after_steps):
            s = state["step"]
            pos = step_examples(n, s, settings, order)
            mine = rank_examples(pos)
            mbs = [collate([examples[i] for i in mine[j:j + settings.micro_batch_size]], pad_token_id)
                   for j in range(0, len(mine), settings.micro_batch_size)]
            if settings.sharding == "fsdp":
                mbs = pad_micro_batches(mbs, len(pos), settings.micro_batch_size,
                                        collate([examples[pos[0]]], pad_token_id))
            lr = lr_at(s, total, settings)
            for group in updater.param_groups:
                group["lr"] = lr
            # every rank divides by the GLOBAL step size len(pos): the summed gradients are the step's mean
            loss = accumulate_grads(model, mbs, len(pos), loss_fn, settings.autocast)
            updater.all_reduce_grads()
            norm = updater.clip_grad_norm_(settings.max_grad_norm)  # over the trained entries, before clipping
            if not math.isfinite(norm):  # stop before the update touches the weights
                idx = [int(examples[i].index) for i in pos]
                raise NonFiniteLossError(f"non-finite gradient norm at step {s + 1} (examples {idx[:20]}); "
                                         "lower --lr or set --max-grad-norm", idx)
            updater.step()
            updater.zero_grad()
            real = [mb for mb in mbs if "scale" not in mb]  # not the padding micro-batches
            loss, tokens = dist.all_reduce_sum([loss, sum(int(mb["attention_mask"].sum()) for mb in real)])
            tokens = int(tokens)
            state["step"], state["tokens"] = s + 1, state["tokens"] + tokens
            state["elapsed"] = time.time() - t_start
            state["metrics"].append({"step": s + 1, "epoch": (s + 1) / steps_per_epoch(n, settings), "loss": loss,
                                     "lr": lr, "grad_norm": norm, "tokens": state["tokens"], "examples": len(pos),
                                     "time": round(state["elapsed"], 3)})
            reporter.log_scalars(s + 1, scalars_of(state["metrics"][-1]))
            done_here += 1
            _bar_update(bar, loss, state)
            if ckpt is not None and settings.checkpoint_every > 0 and (s + 1) % settings.checkpoint_every == 0:
                save_checkpoint(ckpt, updater, state, _fingerprint_settings(settings))  # every rank; rank 0 writes
    finally:
        recompute.close()
        if bar is not None:
            bar.close()
        if isinstance(updater, SparseAdamW):
            updater.remove_hooks()
    if ckpt is not None and state["step"] >= total and settings.checkpoint_every > 0:
        save_checkpoint(ckpt, updater, state, _fingerprint_settings(settings))
    dist.barrier()  # rank 0's checkpoint is on disk before any rank moves on
    if settings.method != "lora":
        for n_, p in model.named_parameters():
            p.requires_grad_(orig_flags.get(n_, True))
    model.eval()
    trained_set = set(trained)
    k = sum(v.numel() for v in mask.values()) if settings.method in ("sparse", "dense-masked") and mask else sum(
        p.numel() for name, p in model.named_parameters() if name in trained_set)
    # (sharded: gathered tensor by tensor onto rank 0, {} on the other ranks)
    c = {name: v.detach().float().cpu() for name, v in updater.exp_avg_sq().items()} if keep_exp_avg_sq else None
    # sharded weights: the trained [k] values gathered from every rank (a collective), for the delta
    values = updater.trainable_values() if settings.sharding == "fsdp" else None
    return TrainResult(model, settings.method, trained, state["metrics"], state["step"], total, state["tokens"],
                       state["elapsed"], k, updater.state_bytes(), c, values)


def _mask_checksum(mask: dict[str, torch.Tensor] | None) -> list[float]:
    """[k, Σ indices (mod 2^31) over every tensor]: equal masks give equal numbers on every rank."""
    if not mask:
        return [0.0, 0.0]
    k = sum(v.numel() for v in mask.values())
    total = sum(int(v.to(torch.int64).sum()) for v in mask.values()) % (1 << 31)
    return [float(k), float(total)]


def _fingerprint_settings(settings: TrainSettings) -> dict:
    """Settings that decide the result (a checkpoint made under others is refused)."""
    d = asdict(settings)
    for k in NEUTRAL_SETTINGS:
        d.pop(k, None)
    return {k: v for k, v in d.items() if k in {f for f in TrainSettings.__dataclass_fields__}}


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="train", dynamic_ncols=True)


def _bar_update(bar, loss: float, state: dict) -> None:
    if bar is None:
        return
    tps = state["tokens"] / max(state["elapsed"], 1e-9)
    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
    bar.update(1)
