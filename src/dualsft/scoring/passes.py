"""The one resumable batch loop every statistic runs on: v_new, v_prior, G, φ_data and LESS's features.

A pass is batches + a per-batch function (``Step``) + accumulators:

    sums[name] += step(batch).sums[name]          per-parameter (or scalar) sums: G, τ²Σw∇KL, Σw, ...
    rows[name]  = concat_b step(batch).rows[name]  per-example values [N, ...] in batch order: φ_data, l_n

``run_pass`` is the loop of one process: progress bar in examples, a ``PassCheckpoint`` (progress.py) saved
every few batches and resumed from, so a rerun after a kill continues bitwise. ``sharded_pass`` adds data
parallelism (docs/method.md §4 "Cost"): each rank takes its shard of the examples, the sums are
all-reduced (SUMS: the caller divides by global counts afterwards) and the rows gathered back into the
examples' order; it also times the pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dualsft import distributed as dist
from dualsft.data.formats import TokenizedExample, batches
from dualsft.losses import IGNORE_INDEX
from dualsft.scoring.progress import PassCheckpoint

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
SUM, ROW = "sum.", "row."  # key prefixes of the two kinds of state in a progress file


@dataclass
class BatchOut:
    """What one batch adds: ``n`` examples, increments of the pass's sums, per-example rows [B, ...]."""

    n: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)


Step = Callable[[Batch], BatchOut]


@dataclass
class PassResult:
    """A finished pass: the sums (the accumulators' dtypes and devices) and the rows [N, ...] on CPU."""

    sums: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor]


def run_pass(batches: Iterable[Batch], step: Step, sums: dict[str, torch.Tensor] | None = None,
             progress: Any | None = None, checkpoint: PassCheckpoint | None = None) -> PassResult:
    """Run ``step`` on every batch, adding its sums into ``sums`` (in place, in their dtype) and
    concatenating its rows. ``progress``: a tqdm-like bar advanced by examples. ``checkpoint``: resume
    from the saved state (skipping the batches it covers) and save it every few batches and at the end."""
    sums = {} if sums is None else sums
    rows: dict[str, list[torch.Tensor]] = {}
    start, saved = checkpoint.load() if checkpoint is not None else (0, {})
    if saved:
        sums = restore(saved, SUM, sums)
        rows = {k[len(ROW):]: [t] for k, t in saved.items() if k.startswith(ROW)}
    for done, batch in remaining(batches, start, progress):
        out = step(batch)
        for name, inc in out.sums.items():
            sums[name] += inc.to(sums[name].dtype)
        for name, r in out.rows.items():
            rows.setdefault(name, []).append(r.detach().cpu())
        if progress is not None:
            progress.update(out.n)
        if checkpoint is not None:
            checkpoint.after_batch(done, lambda: pass_state(sums, rows))
    return PassResult(sums, {name: torch.cat(chunks) for name, chunks in rows.items()})


def pass_state(sums: dict[str, torch.Tensor], rows: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Everything a pass has so far, as one flat dict for its progress file."""
    return {**prefixed(SUM, sums), **{ROW + k: torch.cat(v) for k, v in rows.items()}}


def sharded_pass(name: str, examples: Sequence[TokenizedExample], step: Step, sums: dict[str, torch.Tensor],
                 batch_size: int, pad_id: int, timings: dict[str, dict[str, float]],
                 progress_dir: Path | None = None, every: int = 0, row_names: Sequence[str] = (),
                 presummed: Collection[str] = ()) -> PassResult:
    """``run_pass`` over this rank's shard of ``examples`` (length-sorted batches); sums all-reduced across
    ranks; the ``row_names`` rows gathered into the order of ``examples`` (every example's, on every rank).
    Wall time and examples/s go to ``timings[name]``; the progress file is progress_dir/<name>.

    ``presummed``: the sums that arrive already summed over ranks, as this rank's rows (FSDP2-sharded
    parameters' gradients, ``--sharding fsdp``). They are not all-reduced, and since FSDP's collectives run
    inside every forward and backward, every rank runs the same number of batches: a rank with fewer pads
    with ``filler_batch``es, whose step keeps only those sums (its own contribution is exactly zero)."""
    t0 = time.perf_counter()
    mine, _ = dist.local_items(list(examples))
    shard_batches = batches(mine, batch_size, pad_id, sort_by_length=True)  # less padding; indices travel along
    if presummed:
        longest = int(dist.all_reduce_max([float(len(shard_batches))])[0])
        shard_batches += [filler_batch(examples, batch_size, pad_id)] * (longest - len(shard_batches))
    ckpt = (None if progress_dir is None else
            PassCheckpoint(progress_dir, name, every, len(shard_batches), aligned=bool(presummed)))
    with tqdm(total=len(mine), unit="ex", desc=name, disable=not dist.is_main()) as bar:
        res = run_pass(shard_batches, _skip_filler(_with_index(step), presummed), sums, progress=bar, checkpoint=ckpt)
    dist.all_reduce_dict_({n: t for n, t in res.sums.items() if n not in presummed})  # in place: res.sums's tensors
    res.rows = gather_in_order(res.rows, examples, row_names)
    record_time(timings, name, len(examples), time.perf_counter() - t0)
    return res


FILLER = "filler"  # marks a batch that only keeps a sharded rank in step with the others


def filler_batch(examples: Sequence[TokenizedExample], batch_size: int, pad_id: int) -> Batch:
    """A batch of real examples with NO response token (labels all ignored): every loss is 0, so its
    gradient adds exactly nothing, while the forward and backward run FSDP's collectives like any batch."""
    batch = dict(batches(list(examples[:batch_size]), batch_size, pad_id)[0])
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    batch[FILLER] = torch.ones(())
    return batch


def _skip_filler(step: Step, presummed: Collection[str]) -> Step:
    """``step`` whose filler batches count no example, give no row and keep only the ``presummed`` sums
    (those hold the OTHER ranks' contributions, reduce-scattered to this rank's rows)."""
    def run(batch: Batch) -> BatchOut:
        out = step(batch)
        if FILLER not in batch:
            return out
        return BatchOut(0, sums={n: t for n, t in out.sums.items() if n in presummed})

    return run


def _with_index(step: Step) -> Step:
    """``step`` that also returns each example's stable index as the row "index" (for the gather)."""
    def indexed(batch: Batch) -> BatchOut:
        out = step(batch)
        out.rows["index"] = batch["index"]
        return out

    return indexed


def gather_in_order(rows: dict[str, torch.Tensor], examples: Sequence[TokenizedExample],
                    row_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """This rank's rows (with their stable "index") -> every example's row [N, ...] in ``examples`` order."""
    position = {t.index: i for i, t in enumerate(examples)}
    local = [position[int(i)] for i in rows.get("index", torch.zeros(0, dtype=torch.int64))]
    empty = torch.zeros(0, dtype=torch.float64)
    return {r: dist.gather_rows(rows.get(r, empty), local, len(examples)) for r in row_names}


def record_time(timings: dict[str, dict[str, float]], name: str, n: int, wall: float) -> None:
    """timings[name] = wall time, examples, examples/s (and one log line)."""
    timings[name] = {"wall_time_s": wall, "examples": n, "examples_per_s": n / wall if wall > 0 else float("inf")}
    log.info("pass %-9s %6d examples in %7.1f s (%.2f ex/s)", name, n, wall, timings[name]["examples_per_s"])


def remaining(batches: Iterable[Batch], start: int, progress: Any | None = None) -> Iterator[tuple[int, Batch]]:
    """(batches done after this one, batch) for the batches after the first ``start``; the skipped ones
    only advance the ``progress`` bar by their size."""
    for i, batch in enumerate(batches):
        if i < start:
            if progress is not None:
                progress.update(int(batch["input_ids"].shape[0]))
            continue
        yield i + 1, batch


def restore(saved: dict[str, torch.Tensor], prefix: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved ``prefix + name`` tensors as accumulators on ``like``'s devices and dtypes (exact copies)."""
    return {n: saved[prefix + n].to(device=t.device, dtype=t.dtype) for n, t in like.items()}


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` under ``prefix + name`` (several groups share one progress file)."""
    return {prefix + n: t for n, t in tensors.items()}
