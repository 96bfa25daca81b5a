"""Structured masks: the units a mask is chosen in (``--granularity element|row|column|block:RxC``).

Every parameter is viewed as a matrix [R, C] as it is STORED: a 2-D weight as is (nn.Linear [out, in],
so a row is an output unit; GPT-2's Conv1D stores [in, out], so there a row is an input feature), a 1-D
tensor (norm weight, bias) as one row [1, n], a k-D tensor as [shape[0], prod(rest)].
    element   1 x 1 units (the plain mask)
    row       1 x C units      column   R x 1 units
    block:RxC R x C tiles, clipped to the matrix; edge tiles are smaller (their size is what they hold)
A unit's score is the SUM of its entries' scores (float64); its size is its number of entries, and the
budget k counts entries (see topk.py for how units that do not fit are handled).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from dualsft.errors import ConfigError

_BLOCK = re.compile(r"^block:(\d+)\s*[x×X*]\s*(\d+)$")


@dataclass(frozen=True)
class Granularity:
    """kind: element, row, column or block; block: (R, C) tile shape for kind == "block"."""

    kind: str
    block: tuple[int, int] = (1, 1)

    def __str__(self) -> str:
        return f"block:{self.block[0]}x{self.block[1]}" if self.kind == "block" else self.kind


def parse_granularity(text: str) -> Granularity:
    """``element`` | ``row`` | ``column`` | ``block:RxC`` -> Granularity; anything else raises ConfigError."""
    t = text.strip().lower()
    if t in ("element", "row", "column"):
        return Granularity(t)
    m = _BLOCK.match(t)
    if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
        return Granularity("block", (int(m.group(1)), int(m.group(2))))
    raise ConfigError(f"--granularity {text!r}: use element, row, column or block:RxC (e.g. block:16x16)")


def matrix_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """The [R, C] view of a parameter shape (1-D -> [1, n]; k-D -> [shape[0], prod(rest)])."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(shape[0]), int(math.prod(shape[1:]))


def unit_shape(g: Granularity, shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """(r, c) of one unit of ``g`` for a parameter of ``shape``, clipped to the matrix."""
    R, C = matrix_shape(shape)
    r, c = {"element": (1, 1), "row": (1, C), "column": (R, 1)}.get(g.kind, g.block)
    return min(r, R), min(c, C)


def unit_scores(score: torch.Tensor, g: Granularity) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-unit scores and sizes of one parameter.

    Args:
        score: φ (per entry) shaped like the parameter.
    Returns:
        (units, sizes): for element, units is ``score`` itself viewed flat (no copy; sizes None);
        otherwise units [nR, nC] float64 sums over each unit and sizes [nR, nC] long entry counts.
    """
    if g.kind == "element":
        return score.view(-1), None
    R, C = matrix_shape(score.shape)
    r, c = unit_shape(g, score.shape)
    nR, nC = -(-R // r), -(-C // c)
    x = score.reshape(R, C)
    # Reduce the longer side of the unit first, in the scores' dtype: no full-size copy (a float64 cast
    # of a whole embedding would triple its memory), then the already small result in float64.
    if c >= r:
        units = _group_sum(_group_sum(x, 1, c).double(), 0, r)
    else:
        units = _group_sum(_group_sum(x, 0, r).double(), 1, c)
    rows = torch.full((nR,), r, dtype=torch.long)
    rows[-1] = R - (nR - 1) * r
    cols = torch.full((nC,), c, dtype=torch.long)
    cols[-1] = C - (nC - 1) * c
    return units, torch.outer(rows, cols)


def _group_sum(x: torch.Tensor, dim: int, g: int) -> torch.Tensor:
    """Sums of consecutive groups of ``g`` along ``dim`` of a 2-D tensor (the last group may be shorter).

    [R, C] -> [ceil(R/g), C] (dim 0) or [R, ceil(C/g)] (dim 1); views, no copy of the input."""
    if g == 1:
        return x
    n = x.shape[dim]
    full = n // g * g
    main = x.narrow(dim, 0, full)
    shape = (full // g, g, x.shape[1]) if dim == 0 else (x.shape[0], full // g, g)
    parts = [main.reshape(shape).sum(dim=dim + 1)] if full else []
    if full < n:
        parts.append(x.narrow(dim, full, n - full).sum(dim=dim, keepdim=True))
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]


def units_to_indices(chosen: torch.Tensor, shape: tuple[int, ...] | torch.Size, g: Granularity) -> torch.Tensor:
    """Sorted flat entry indices (int64) covered by the chosen units.

    Args:
        chosen: bool, shaped like ``unit_scores``'s units ([numel] for element, [nR, nC] otherwise).
    """
    if g.kind == "element":
        return torch.nonzero(chosen.reshape(-1)).flatten()
    R, C = matrix_shape(shape)
    r, c = unit_shape(g, shape)
    dense = chosen.repeat_interleave(r, dim=0)[:R].repeat_interleave(c, dim=1)[:, :C]  # [R, C]
    return torch.nonzero(dense.reshape(-1)).flatten()
