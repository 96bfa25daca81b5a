"""`dualsft train` / `dualsft merge` end to end on a micro model saved as a HF folder."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from train_helpers import train_run_folder

from dualsft.cli import main
from dualsft.io import read_json
from dualsft.training.delta import apply_delta


@pytest.fixture()
def run(tmp_path):
    """RUN/ with selection/subset.jsonl + mask.safetensors + data/pool.jsonl, and a micro model folder."""
    return train_run_folder(tmp_path)


def _args(run, model_dir, *extra: str) -> list[str]:
    return ["train", "--run-dir", str(run), "--model", str(model_dir), "--batch-size", "4", "--micro-batch-size", "2",
            "--epochs", "2", "--lr", "1e-2", "--max-length", "64", "--no-progress", "--attn-implementation", "eager",
            *extra]


def test_train_writes_artifacts_and_merge_loads(run, tmp_path) -> None:
    run_dir, model_dir, mask = run
    assert main(_args(run_dir, model_dir, "--checkpoint-every", "1")) == 0
    out = run_dir / "train"
    for f in ("delta.safetensors", "adapter.json", "metrics.jsonl", "loss_curve.png", "metadata.json"):
        assert (out / f).exists(), f
    assert not (out / "checkpoints").exists()
    info = read_json(out / "adapter.json")
    assert info["complete"] and info["method"] == "sparse" and info["mask"]["k"] == sum(v.numel() for v in mask.values())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all({"loss", "lr", "tokens", "time"} <= set(r) for r in rows)
    # merge -> HF folder equal to base + delta
    assert main(["merge", "--run-dir", str(run_dir)]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    ref = apply_delta(AutoModelForCausalLM.from_pretrained(model_dir), out)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    changed = 0
    for (n, p), (_, q), (_, b) in zip(merged.named_parameters(), ref.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n
        changed += int(p.ne(b).sum())
    assert 0 < changed <= info["mask"]["k"]
    assert (run_dir / "merged" / "tokenizer_config.json").exists()
    # a rerun of a finished run does nothing; other settings in the same folder are refused
    assert main(_args(run_dir, model_dir, "--checkpoint-every", "1")) == 0
    assert main(_args(run_dir, model_dir, "--weight-decay", "0.1")) == 2


def test_rerun_resumes_after_interruption(run, tmp_path, monkeypatch, caplog) -> None:
    """Kill-like interruption after step 2 (checkpoint every step), rerun -> same delta as one clean run."""
    run_dir, model_dir, _ = run
    assert main(_args(run_dir, model_dir, "--out", str(tmp_path / "clean"))) == 0
    import dualsft.training.loop as loop

    real = loop.save_checkpoint
    calls = {"n": 0}

    def crash_after_two(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process dies right after the step-2 checkpoint

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        main(_args(run_dir, model_dir, "--checkpoint-every", "1"))
    assert not (run_dir / "train" / "adapter.json").exists()
    assert read_json(run_dir / "train" / "checkpoints" / "latest.json")["step"] == 2
    monkeypatch.setattr(loop, "save_checkpoint", real)
    with caplog.at_level(logging.INFO, logger="dualsft"):
        assert main(_args(run_dir, model_dir, "--checkpoint-every", "1")) == 0
    assert "resumed from checkpoint at step 2 of 4" in caplog.text
    from dualsft.io import load_tensors

    a, b = load_tensors(tmp_path / "clean" / "delta.safetensors"), load_tensors(run_dir / "train" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,kind", [(("--mask", "none"), "full"), (("--method", "lora"), "lora"),
                                        (("--data", "all"), "sparse")])
def test_single_axis_variants_and_baselines(run, extra, kind) -> None:
    run_dir, model_dir, _ = run
    assert main(_args(run_dir, model_dir, "--epochs", "1", *extra)) == 0
    info = read_json(run_dir / "train" / "adapter.json")
    assert info["method"] == kind
    assert (run_dir / "train" / ("adapter" if kind == "lora" else "delta.safetensors")).exists()
    n_rows = len((run_dir / "train" / "metrics.jsonl").read_text().splitlines())
    assert n_rows == (3 if extra[0] == "--data" else 2)  # 12 pool examples vs 6 selected, batch 4
    from transformers import AutoModelForCausalLM

    tuned = apply_delta(AutoModelForCausalLM.from_pretrained(model_dir), run_dir / "train")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert any(not torch.equal(p, q) for p, q in zip(tuned.parameters(), base.parameters()))


def test_missing_selection_is_actionable(tmp_path, caplog) -> None:
    assert main(["train", "--run-dir", str(tmp_path), "--model", "x"]) == 2
    assert "dualsft select" in caplog.text
