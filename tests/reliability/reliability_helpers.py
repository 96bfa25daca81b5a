"""Helpers of the reliability tests (a module of its own: several test folders have a conftest.py, so
``from conftest import`` would pick whichever was imported first when the whole suite runs)."""

from __future__ import annotations

import json
from pathlib import Path


def write_records(path: Path, records: list[dict]) -> Path:
    """JSONL file of ``records`` (a test's own data)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def model_args(model_dir: Path, run: Path, *extra: str) -> list[str]:
    """Options every model-using stage takes in these tests (tiny lengths and batches)."""
    return ["--model", str(model_dir), "--run-dir", str(run), "--max-length", "64", *extra]


def score_args(model_dir: Path, run: Path, data: Path, *extra: str) -> list[str]:
    """`dualsft score` at θ0, first order (no warm-up needed), on the toy files of ``data``."""
    return ["score", *model_args(model_dir, run), "--pool", str(data / "pool.jsonl"), "--target",
            str(data / "target.jsonl"), "--order", "1", "--batch-size", "4", *extra]
