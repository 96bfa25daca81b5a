"""Resume after a kill: SIGKILL a real `dualsft score` / `dualsft train` subprocess mid-run, rerun the same
command, and require bitwise the outputs of an uninterrupted run (docs/errors.md, "Resume")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reliability_helpers import write_records

from dualsft.io import load_tensors, save_tensors, write_jsonl
from dualsft.selection.mask import save_mask
from dualsft.testing import micro_llama, toy_records

pytestmark = pytest.mark.slow
SCORE_FILES = ("param_scores.safetensors", "u.safetensors", "v.safetensors", "grad_sum.safetensors")
TIMEOUT_S = 120


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dualsft", *args]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI to completion in a fresh process; fail with its log if it does not exit 0."""
    done = subprocess.run(_cmd(args), env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _kill_when(args: list[str], ready: Callable[[], bool]) -> None:
    """Start the CLI, SIGKILL it as soon as ``ready()`` holds; fail if it exits first (make it slower)."""
    proc = subprocess.Popen(_cmd(args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    try:
        while not ready():
            assert proc.poll() is None, f"the command ended (rc {proc.returncode}) before it could be killed; " \
                                        f"make the workload bigger:\n{proc.stderr.read()[-4000:] if proc.stderr else ''}"
            assert time.monotonic() - t0 < TIMEOUT_S, "no progress checkpoint appeared in time"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _batches_done(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["batches_done"])
    except (OSError, ValueError, KeyError):  # absent, or caught between the temp file and the rename
        return 0


def _same_tensors(a: Path, b: Path) -> None:
    x, y = load_tensors(a), load_tensors(b)
    assert x.keys() == y.keys(), a.name
    for k in x:
        assert torch.equal(x[k], y[k]), f"{a.name}: {k}"


def test_score_resumes_bitwise_after_sigkill(micro_model_dir: Path, tmp_path: Path) -> None:
    """Order 2 at θ0 (target, pool_G, pool_rows passes), checkpoint every batch, killed inside pool_G."""
    write_records(tmp_path / "pool.jsonl", toy_records(40))
    write_records(tmp_path / "target.jsonl", toy_records(6, seed=1))
    c = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) * 1e-3
         for i, (n, p) in enumerate(micro_llama(tied=True, seed=0).named_parameters())}
    save_tensors(tmp_path / "c.safetensors", c)

    def args(run: Path) -> list[str]:
        return ["score", "--model", str(micro_model_dir), "--run-dir", str(run), "--max-length", "64",
                "--pool", str(tmp_path / "pool.jsonl"), "--target", str(tmp_path / "target.jsonl"), "--order", "2",
                "--curvature", str(tmp_path / "c.safetensors"), "--batch-size", "2", "--eta", "1e-2",
                "--checkpoint-every", "1"]

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    _run(args(clean))
    progress = killed / "scores" / "progress"
    _kill_when(args(killed), lambda: _batches_done(progress / "pool_G.json") >= 3)
    out = killed / "scores"
    assert not (out / "summary.json").exists()
    assert not any((out / f).exists() for f in SCORE_FILES)
    assert _batches_done(progress / "target.json") == 3  # finished pass saved whole: the rerun skips it
    assert 3 <= _batches_done(progress / "pool_G.json") < 20
    rerun = _run(args(killed))
    assert "pass target resumes after 3 of 3 batches" in rerun.stderr
    assert "pass pool_G resumes after" in rerun.stderr
    for f in SCORE_FILES:
        _same_tensors(clean / "scores" / f, out / f)
    assert (clean / "scores" / "data_scores.jsonl").read_bytes() == (out / "data_scores.jsonl").read_bytes()
    assert not progress.exists() and not (clean / "scores" / "progress").exists()


def _train_run(tmp_path: Path, model_dir: Path, name: str) -> Path:
    """RUN/ with selection/subset.jsonl (40 examples) and a sparse mask (every 7th entry)."""
    run = tmp_path / name
    pool = toy_records(40, seed=2)
    write_jsonl(run / "data" / "pool.jsonl", pool)
    write_jsonl(run / "selection" / "subset.jsonl", [{**r, "index": i, "score": 1.0} for i, r in enumerate(pool)])
    model = micro_llama(tied=True, seed=0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    save_mask(run / "selection" / "mask.safetensors",
              {n: torch.arange(0, p.numel(), 7, dtype=torch.int32) for n, p in model.named_parameters()}, shapes)
    return run


def test_train_resumes_bitwise_after_sigkill(micro_model_dir: Path, tmp_path: Path) -> None:
    """`dualsft train --checkpoint-every 1` killed after its first checkpoint, rerun -> the clean run's delta."""

    def args(run: Path) -> list[str]:
        return ["train", "--run-dir", str(run), "--model", str(micro_model_dir), "--batch-size", "2",
                "--micro-batch-size", "2", "--epochs", "1", "--lr", "1e-2", "--max-length", "64", "--no-progress",
                "--attn-implementation", "eager", "--checkpoint-every", "1"]

    clean, killed = _train_run(tmp_path, micro_model_dir, "clean"), _train_run(tmp_path, micro_model_dir, "killed")
    _run(args(clean))
    latest = killed / "train" / "checkpoints" / "latest.json"
    _kill_when(args(killed), latest.exists)
    assert not (killed / "train" / "delta.safetensors").exists()
    assert not (killed / "train" / "adapter.json").exists()
    step = json.loads(latest.read_text())["step"]
    assert 1 <= step < 20
    rerun = _run(args(killed))
    assert "resumed from checkpoint at step" in rerun.stderr
    _same_tensors(clean / "train" / "delta.safetensors", killed / "train" / "delta.safetensors")
