"""bench/gpu_check.py on the micro config on CPU: the GPU readiness script runs every stage end to end and
writes a table and JSON (the GPU numbers themselves come only from a CUDA machine)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dualsft.testing import one_torch_thread

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_gpu_check_tiny_on_cpu(tmp_path, capsys) -> None:
    out = tmp_path / "gpu_check.json"
    with one_torch_thread():
        rc = load_script().main(["--tiny", "--device", "cpu", "--pool", "16", "--val", "4", "--seq-len", "96",
                                 "--work", str(tmp_path / "work"), "--out", str(out)])
    assert rc == 0
    row = json.loads(out.read_text())["rows"][0]
    assert "error" not in row and row["params"] > 0
    assert set(row["stages"]) == {"warmup", "score", "select", "train"}
    for name in ("warmup", "score", "train"):
        s = row["stages"][name]
        assert s["examples"] > 0 and s["compute_s"] > 0 and s["examples_per_s"] > 0, name
    assert row["plain"]["examples_per_s"] > 0
    # the stages really ran: the scores and a trained delta are on disk
    run = tmp_path / "work" / "tiny" / "run"
    assert (run / "scores" / "data_scores.jsonl").exists() and (run / "train" / "delta.safetensors").exists()
    assert "| tiny | score |" in capsys.readouterr().out


def test_gpu_check_refuses_cuda_without_a_gpu(capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal is for CPU-only machines")
    assert load_script().main(["--sizes", "1b"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
