"""The multi-stage config and the helpers `dualsft run` and `dualsft compare` share.

``RunConfig`` holds one section per stage, each that stage's own config dataclass (docs/method.md §5):

    data: DataBuildConfig   warmup: WarmupConfig   score: ScoreConfig
    select: SelectConfig    train: TrainConfig     eval: EvalConfig

so YAML ``score: {batch_size: 8, method: ghost}`` and ``--score.batch-size 8`` reach every stage option
without a renamed copy. The common options (``CommonConfig``: run_dir, model, dtype, device, template,
max_length, drop_empty, seed, overwrite) stay top-level and every section gets them; the paths one stage
hands to the next (pool, target, subset, ...) are set here, not by the user.

The run's defaults that differ from the stages' are declared once, in the ``section(...)`` calls below.
They are sized for the embedded SmolLM2-135M on 2 CPU cores: a 384-example pool, 8 held-out examples per
stability task and 8 HumanEval records (the data build's own defaults are larger: 512/16/16; with those,
one measured run took 28 minutes on a 2-core machine shared with other jobs, scoring and evaluation
taking 13 and 12 minutes). They deviate from the paper's training defaults (docs/method.md §5) where a
CPU demo needs it, on purpose: lr 2e-4 instead of 2e-5 and batch 8 instead of 64, because 10% of a
512-example pool for 3 epochs at batch 64 would be 3 optimizer steps. Pass the paper's values
(``--train.lr 2e-5 --train.batch-size 64``) to reproduce its setting at scale.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dualsft.config import CommonConfig, opt, pass_down_common, section
from dualsft.data.build import DataBuildConfig
from dualsft.errors import ConfigError
from dualsft.evaluation.evaluate import EvalConfig
from dualsft.scoring.score import ScoreConfig
from dualsft.scoring.warmup import WarmupConfig
from dualsft.selection.select import SelectConfig
from dualsft.training.train import TrainConfig

log = logging.getLogger(__name__)
C = TypeVar("C")


# select's model and dtype are those of its optional refinement passes (default: the scores' model, float32),
# not the run's: they stay options of the section
SELECT_WIRING: dict[str, Any] = {"wired": ("out",), "own": ("model", "dtype")}


@dataclass(frozen=True)
class RunConfig(CommonConfig):
    """Options of `dualsft run`: the common options, --data-dir, and one section per stage."""

    run_dir: str = opt("runs/main", "run folder; each stage writes RUN/<stage>/ and the report goes to RUN/report.md")
    data_dir: str = opt("", "folder with pool.jsonl, val.jsonl, test.jsonl (and stability.jsonl); "
                            "empty: build the embedded reasoning-gym data into RUN/data (the data section)")
    pool: str = opt("", "the pool instead of DATA_DIR/pool.jsonl: a file, a saved dataset FOLDER[@split] or "
                        "hf://owner/name[:config][@split], each optionally ?prompt=COL&response=COL")
    target: str = opt("", "the target set V instead of DATA_DIR/val.jsonl (spellings as --pool)")
    test: str = opt("", "the test split instead of DATA_DIR/test.jsonl (spellings as --pool); with --pool, "
                        "--target and --test all given, no data is built")
    data: DataBuildConfig = section(DataBuildConfig, "the embedded data (`dualsft data build`; unused with "
                                    "--data-dir)", wired=("out",), pool_size=384, stability_size=8, humaneval_size=8)
    warmup: WarmupConfig = section(WarmupConfig, "the warm-up (`dualsft warmup`)", wired=("pool",))
    score: ScoreConfig = section(ScoreConfig, "scoring (`dualsft score`; the target set is the data's val split)",
                                 wired=("pool", "target"), batch_size=8)
    select: SelectConfig = section(SelectConfig, "selection (`dualsft select`)", **SELECT_WIRING)
    train: TrainConfig = section(TrainConfig, "restricted fine-tuning (`dualsft train`; paper: lr 2e-5, batch 64 "
                                 "on 3B-9B)", wired=("subset", "mask", "data", "train_file", "out"),
                                 lr=2e-4, batch_size=8)
    eval: EvalConfig = section(EvalConfig, "evaluation, base vs tuned (`dualsft eval`)",
                               wired=("data_dir", "test", "train_dir", "out", "base_model"))

    def __post_init__(self) -> None:
        super().__post_init__()
        pass_down_common(self)


def stage_config(stage: C, **wired: Any) -> C:
    """A section's config with the paths the orchestrator wires in (and any per-call settings)."""
    return dataclasses.replace(stage, **wired)  # type: ignore[type-var]


def data_files(cfg: RunConfig) -> dict[str, Path]:
    """pool/val/test/stability paths of the data folder (stability optional; see ``data_sources``)."""
    d = Path(cfg.data_dir) if cfg.data_dir else Path(cfg.run_dir) / "data"
    files = {k: d / f"{k}.jsonl" for k in ("pool", "val", "test", "stability")}
    if cfg.data_dir:
        given = {"pool": cfg.pool, "val": cfg.target, "test": cfg.test}
        missing = [str(p) for k, p in files.items() if k != "stability" and not given[k] and not p.exists()]
        if missing:
            raise ConfigError(f"--data-dir {d} lacks {missing}; it needs pool.jsonl, val.jsonl and test.jsonl "
                              "(or --pool / --target / --test)")
    return files


def data_sources(cfg: RunConfig) -> dict[str, str]:
    """The pool / val / test sources a run reads: --pool / --target / --test, else the data folder's files."""
    files = data_files(cfg)
    return {"pool": cfg.pool or str(files["pool"]), "val": cfg.target or str(files["val"]),
            "test": cfg.test or str(files["test"])}


def builds_data(cfg: RunConfig) -> bool:
    """Whether the run builds the embedded data into RUN/data: no --data-dir, and not every split given."""
    return not cfg.data_dir and not (cfg.pool and cfg.target and cfg.test)


def refuse_multiprocess(command: str) -> None:
    """The pipeline's data, selection and eval stages are single-process: under torchrun, say what to do."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"`dualsft {command}` runs in one process; under torchrun run the multi-process stages "
                          "one by one (torchrun ... -m dualsft warmup / score / train), and data build, select and "
                          "eval without torchrun (see docs/scaling.md)")


def run_stage(name: str, fn: Any, cfg: Any, timings: dict[str, float]) -> None:
    """Run one stage's main(cfg), timing it; a non-zero exit code stops the pipeline."""
    log.info("=== %s ===", name)
    t0 = time.time()
    rc = fn(cfg)
    timings[name] = round(time.time() - t0, 1)
    if rc:
        raise SystemExit(rc)
