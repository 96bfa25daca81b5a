"""Progress checkpoints of the scoring passes (scoring/passes.py), so `dualsft score` resumes after a kill
(docs/errors.md, "Resume").

A pass (target, anchor, pool, pool_G, pool_rows) that is given a ``PassCheckpoint`` saves its partial
accumulators every ``every`` batches, and once more when it ends, to

    RUN/scores/progress/<pass>.safetensors      the partial sums / row chunks so far (exact dtypes)
    RUN/scores/progress/<pass>.json             {"pass", "batches_done", "n_batches", "rank", "world_size", "layout"}

(with ``.rank<r>`` before the suffix under several processes: each rank checkpoints its own shard of the
examples, and under ``--sharding fsdp`` its own rows of the sums; there each rank also keeps its previous
save, ``<pass>.rank<r>.prev.safetensors``, so the ranks can agree on a common batch after a kill). The
safetensors file is written atomically and carries the same facts in its header, which is what a resume
reads; the JSON is for people and tests. On a rerun the pass skips the done batches and keeps adding to
the saved sums in the same order, so the result is bitwise that of an uninterrupted run on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from dualsft import distributed as dist
from dualsft.io import load_tensors, save_tensors, write_json

log = logging.getLogger(__name__)

PROGRESS_DIR = "progress"


class PassCheckpoint:
    """Save / restore the partial state of one batch loop (see the module docstring)."""

    def __init__(self, folder: str | Path, name: str, every: int, n_batches: int, aligned: bool = False) -> None:
        """``folder``: RUN/scores/progress; ``every``: batches between saves (0: never save nor resume).
        ``aligned``: the ranks' states are rows of ONE sum (``--sharding fsdp``), so every rank must resume
        from the same batch. A kill can fall between two ranks' saves, so each rank also keeps its previous
        save (``<stem>.prev.safetensors``) and ``load`` resumes from the latest batch count EVERY rank has."""
        self.name, self.every, self.n_batches, self.aligned = name, int(every), int(n_batches), aligned
        self.rank, self.world_size = dist.rank(), dist.world_size()
        stem = name if self.world_size == 1 else f"{name}.rank{self.rank}"
        self.path = Path(folder) / f"{stem}.safetensors"
        self.prev_path = Path(folder) / f"{stem}.prev.safetensors"
        self.info_path = Path(folder) / f"{stem}.json"

    def _info(self, done: int) -> dict[str, int | str]:
        return {"pass": self.name, "batches_done": done, "n_batches": self.n_batches, "rank": self.rank,
                "world_size": self.world_size, "layout": "sharded" if self.aligned else "replicated"}

    def load(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(batches done, saved tensors); (0, {}) when off, absent, or made for another sharding. With
        ``aligned`` it is a collective: the ranks resume from the largest batch count all of them saved (their
        latest or previous save), or all start over when there is none."""
        if self.every <= 0:
            return 0, {}
        saves = {d: p for p in (self.path, self.prev_path) if (d := self._batches_done(p)) is not None}
        done = max(saves, default=0)
        if self.aligned:
            done = int(-dist.all_reduce_max([-float(done)])[0])  # the latest save every rank can reach
            everyone = dist.all_reduce_max([0.0 if done in saves or done == 0 else 1.0])[0] == 0
            if not everyone:
                log.warning("pass %s: the ranks hold no common save (rank %d has batches %s); this pass starts "
                            "over", self.name, self.rank, sorted(saves))
                return 0, {}
        if done == 0:
            return 0, {}
        log.info("pass %s resumes after %d of %d batches (%s)", self.name, done, self.n_batches, saves[done])
        return done, load_tensors(saves[done])

    def _batches_done(self, path: Path) -> int | None:
        """The batch count a progress file was saved after, or None if absent or made for other settings."""
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        expected = {k: str(v) for k, v in self._info(0).items() if k != "batches_done"}
        found = {"layout": "replicated", **header}  # progress files from before --sharding fsdp
        if any(found.get(k) != v for k, v in expected.items()):
            log.warning("ignoring %s: made for %s, not %s; this pass starts over", path, header, expected)
            return None
        return int(header["batches_done"])

    def save(self, done: int, tensors: dict[str, torch.Tensor]) -> None:
        """Atomically write the state after ``done`` batches (tensors first, then the JSON note); ``aligned``:
        the save it replaces is kept as the previous one (a rename: atomic too)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.aligned and self.path.exists():
            self.path.replace(self.prev_path)
        info = self._info(done)
        save_tensors(self.path, tensors, metadata={k: str(v) for k, v in info.items()})
        write_json(self.info_path, info)

    def after_batch(self, done: int, state: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Save ``state()`` when ``done`` is a multiple of ``every`` or the last batch (no-op when off)."""
        if self.every > 0 and (done % self.every == 0 or done == self.n_batches):
            self.save(done, state())

