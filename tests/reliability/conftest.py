"""Shared fixtures of the reliability tests: toy data files, a scored micro run, and a CLI helper that
returns the typed error a failing command raised (``dualsft.cli.main`` logs it and returns 2)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_helpers import score_args, write_records

from dualsft.cli import main as cli
from dualsft.errors import DualSFTError
from dualsft.testing import one_torch_thread, toy_records


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: faster on the shared 2-core machine, and the determinism tests compare bits."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pool.jsonl (10 toy records) and target.jsonl (4 toy records)."""
    d = tmp_path_factory.mktemp("reldata")
    write_records(d / "pool.jsonl", toy_records(10))
    write_records(d / "target.jsonl", toy_records(4, seed=1))
    return d


@pytest.fixture(scope="session")
def scored_run_dir(tmp_path_factory: pytest.TempPathFactory, micro_model_dir: Path, data_dir: Path) -> Path:
    """A run folder with RUN/scores from the real `dualsft score` (copy it before writing into it)."""
    with one_torch_thread():
        run = tmp_path_factory.mktemp("scored") / "run"
        assert cli(score_args(micro_model_dir, run, data_dir)) == 0
        return run


@pytest.fixture
def run_copy(scored_run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the scored run."""
    dst = tmp_path / "run"
    shutil.copytree(scored_run_dir, dst)
    return dst


@pytest.fixture
def fail(caplog: pytest.LogCaptureFixture):
    """``fail(argv)``: run the CLI, require exit code 2 and exactly one logged DualSFTError; return it.

    cli.main logs ``"%s: %s", type(e).__name__, e`` on a DualSFTError, so the record carries the
    exception object itself: the test checks its exact type and attributes, not only the text."""

    def run(argv: list[str]) -> DualSFTError:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dualsft"):
            rc = cli(argv)
        errors = [r.args[1] for r in caplog.records
                  if r.levelno == logging.ERROR and isinstance(r.args, tuple) and len(r.args) == 2
                  and isinstance(r.args[1], DualSFTError)]
        assert rc == 2, f"expected exit code 2, got {rc}; log:\n{caplog.text}"
        assert len(errors) == 1, caplog.text
        err = errors[0]
        assert "\n" not in str(err), f"error message is not one line: {err}"
        return err

    return run
