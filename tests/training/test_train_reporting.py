"""`--report-to tensorboard`: the event files hold metrics.jsonl's values step by step, a resumed run logs each
step once, `none` writes nothing, reporting never forces --overwrite, and a missing tensorboard is a ConfigError."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helpers import train_run_folder

import dualsft.training.loop as loop
from dualsft.cli import main
from dualsft.io import read_json
from dualsft.training.reporting import scalars_of

TAGS = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s")


@pytest.fixture()
def run(tmp_path):
    """RUN/ with data/pool.jsonl, selection/subset.jsonl (6 examples) + mask.safetensors; a micro model folder."""
    return train_run_folder(tmp_path)[:2]


def _train(run_dir: Path, model_dir: Path, *extra: str) -> list[str]:
    """6 examples, batch 4 -> 2 steps per epoch; 3 epochs = 6 steps; a checkpoint every 2 steps."""
    return ["train", "--run-dir", str(run_dir), "--model", str(model_dir), "--batch-size", "4",
            "--micro-batch-size", "2", "--epochs", "3", "--lr", "1e-2", "--max-length", "64", "--no-progress",
            "--attn-implementation", "eager", "--checkpoint-every", "2", "--lr-schedule", "cosine", *extra]


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard reads the folder (all event files, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_events_equal_metrics(events: dict, rows: list[dict]) -> None:
    """Every tag has one event per metrics row, equal to ``scalars_of(row)`` in float32 (TensorBoard's)."""
    assert sorted(events) == sorted(TAGS)
    for tag in TAGS:
        assert [s for s, _ in events[tag]] == [r["step"] for r in rows], tag
        assert [v for _, v in events[tag]] == [np.float32(scalars_of(r)[tag]) for r in rows], tag


def test_train_writes_tensorboard_curves_equal_to_metrics(run) -> None:
    run_dir, model_dir = run
    assert main(_train(run_dir, model_dir, "--report-to", "tensorboard")) == 0
    out = run_dir / "train"
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    events = _events(out / "tensorboard")
    _assert_events_equal_metrics(events, rows)
    assert len({v for _, v in events["train/lr"]}) > 1  # the cosine schedule is visible
    assert read_json(out / "adapter.json")["training"]["report_to"] == "tensorboard"


def test_none_writes_nothing_and_a_resume_logs_each_step_once(run, monkeypatch) -> None:
    """Run 1 (--report-to none) dies after step 3, past its step-2 checkpoint: no tensorboard/. Run 2
    (tensorboard) resumes at step 3 and dies the same way: its event file holds step 3. Run 3 resumes at step
    3 again and logs 3-6 under purge_step 3: TensorBoard shows steps 3-6 once each, equal to metrics.jsonl.
    Changing --report-to between the runs never raises a metadata mismatch (no --overwrite anywhere)."""
    run_dir, model_dir = run
    out = run_dir / "train"
    real = loop.scalars_of

    def die_at_step_4(row: dict) -> dict:
        if row["step"] == 4:
            raise KeyboardInterrupt  # the process dies after logging step 3, before any step-4 checkpoint
        return real(row)

    monkeypatch.setattr(loop, "scalars_of", die_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        main(_train(run_dir, model_dir))
    assert read_json(out / "checkpoints" / "latest.json")["step"] == 2
    assert not (out / "tensorboard").exists()
    with pytest.raises(KeyboardInterrupt):
        main(_train(run_dir, model_dir, "--report-to", "tensorboard"))
    assert [s for s, _ in _events(out / "tensorboard")["train/loss"]] == [3]
    monkeypatch.setattr(loop, "scalars_of", real)
    assert main(_train(run_dir, model_dir, "--report-to", "tensorboard")) == 0
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    _assert_events_equal_metrics(_events(out / "tensorboard"), rows[2:])  # step 3 once, not twice


def test_report_to_does_not_change_metadata_or_force_overwrite(run) -> None:
    """A finished run with --report-to none is reused by a rerun with tensorboard (and back): no
    MetadataMismatchError, no retraining, metadata.json untouched."""
    run_dir, model_dir = run
    assert main(_train(run_dir, model_dir, "--epochs", "1")) == 0
    meta = (run_dir / "train" / "metadata.json").read_bytes()
    assert main(_train(run_dir, model_dir, "--epochs", "1", "--report-to", "tensorboard")) == 0
    assert not (run_dir / "train" / "tensorboard").exists()  # finished already: nothing trained, nothing logged
    assert (run_dir / "train" / "metadata.json").read_bytes() == meta
    assert main(_train(run_dir, model_dir, "--epochs", "1", "--weight-decay", "0.1")) == 2  # a real change is refused


def test_warmup_reports_its_steps_and_reuses_its_folder(run) -> None:
    run_dir, model_dir = run
    args = ["warmup", "--run-dir", str(run_dir), "--model", str(model_dir), "--pool", str(run_dir / "data" / "pool.jsonl"),
            "--warmup-ratio", "1", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--max-length", "64"]
    assert main([*args, "--report-to", "tensorboard"]) == 0
    summary = read_json(run_dir / "warmup" / "summary.json")
    events = _events(run_dir / "warmup" / "tensorboard")
    assert sorted(events) == sorted(TAGS)
    assert [s for s, _ in events["train/loss"]] == [1, 2, 3]  # 12 examples, batch 4
    assert [v for _, v in events["train/loss"]] == [np.float32(x) for x in summary["step_losses"]]
    assert [v for _, v in events["train/lr"]] == [np.float32(1e-3)] * 3
    meta = (run_dir / "warmup" / "metadata.json").read_bytes()
    assert main(args) == 0  # --report-to none now: the finished warm-up is reused, not refused
    assert (run_dir / "warmup" / "metadata.json").read_bytes() == meta


def test_missing_tensorboard_is_an_actionable_config_error(run, monkeypatch, caplog) -> None:
    run_dir, model_dir = run
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    assert main(_train(run_dir, model_dir, "--report-to", "tensorboard")) == 2
    assert "ConfigError" in caplog.text and 'pip install "dualsft[tensorboard]"' in caplog.text
    assert not (run_dir / "train").exists()  # refused before anything was written
    assert main(_train(run_dir, model_dir, "--epochs", "1")) == 0  # none needs no tensorboard
