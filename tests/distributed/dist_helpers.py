"""Helpers for the multi-process tests: launch `torchrun --standalone` on CPU (gloo) and compare artifacts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualsft.io import load_tensors, read_jsonl

TORCHRUN_TIMEOUT_S = 300


def torchrun_cmd() -> list[str]:
    """torchrun next to this Python (the venv's), else ``python -m torch.distributed.run``."""
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def run_torchrun(args: list[str], nproc: int = 2, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node nproc ARGS`` on CPU; fail the test with its output on error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*torchrun_cmd(), "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a − b| / max(max|a|, tiny): the tolerance measure the docs report."""
    assert set(a) == set(b)
    out = 0.0
    for n in a:
        x, y = a[n].double(), b[n].double()
        assert x.shape == y.shape, n
        out = max(out, float((x - y).abs().max()) / max(float(x.abs().max()), 1e-30))
    return out


def tensors_rel_diff(f1: Path, f2: Path) -> float:
    return max_rel_diff(load_tensors(f1), load_tensors(f2))


def rows_rel_diff(f1: Path, f2: Path, key: str = "score") -> float:
    """Relative difference of a per-example column of two data_scores.jsonl, which must be in the same order."""
    r1, r2 = read_jsonl(f1), read_jsonl(f2)
    assert [r["index"] for r in r1] == [r["index"] for r in r2]
    a = torch.tensor([r[key] for r in r1], dtype=torch.float64)
    b = torch.tensor([r[key] for r in r2], dtype=torch.float64)
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def copy_stage(src_run: Path, dst_run: Path, stage: str) -> None:
    shutil.copytree(src_run / stage, dst_run / stage)
