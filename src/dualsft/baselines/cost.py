"""Scoring-cost records: wall time and model passes, counted the same way for every baseline.

    wall_s              seconds spent selecting (scoring + ranking), wall clock
    forward_passes      batched forward calls of a model (one per batch)
    backward_passes     batched backward calls (one per batch; a backward-per-example loop counts B)
    examples_processed  examples pushed through a forward, summed over every pass (an example scored by
                        two stages counts twice)
Hybrids add their stages' records and keep them under ``stages``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Cost:
    """A mutable cost record (see module docstring for the units)."""

    wall_s: float = 0.0
    forward_passes: int = 0
    backward_passes: int = 0
    examples_processed: int = 0
    stages: list[dict[str, Any]] = field(default_factory=list)
    _t0: float | None = field(default=None, repr=False)

    def start(self) -> Cost:
        """Start the wall clock (returns self)."""
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> Cost:
        """Stop the wall clock, adding the elapsed seconds (returns self)."""
        if self._t0 is not None:
            self.wall_s += time.perf_counter() - self._t0
            self._t0 = None
        return self

    def count(self, batch_size: int, backward: bool) -> None:
        """Record one batched forward (and backward) over ``batch_size`` examples."""
        self.forward_passes += 1
        self.backward_passes += int(backward)
        self.examples_processed += int(batch_size)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"wall_s": round(self.wall_s, 4), "forward_passes": self.forward_passes,
                               "backward_passes": self.backward_passes, "examples_processed": self.examples_processed}
        if self.stages:
            out["stages"] = self.stages
        return out


def combine(stages: list[tuple[str, Cost]]) -> Cost:
    """Sum of stage costs, with each stage's own record kept under ``stages`` (name in "stage")."""
    total = Cost()
    for name, c in stages:
        total.wall_s += c.wall_s
        total.forward_passes += c.forward_passes
        total.backward_passes += c.backward_passes
        total.examples_processed += c.examples_processed
        total.stages.append({"stage": name, **c.as_dict()})
    return total
