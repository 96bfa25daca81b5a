"""Where the training loop reports its per-step scalars (``--report-to none|tensorboard``).

A reporter has two methods: ``log_scalars(step, {tag: value})`` and ``close()``. The loop calls
``log_scalars`` once per optimizer step with ``scalars_of(metrics_row)``, so every curve is a copy of a
``metrics.jsonl`` column (the file stays the record; the curves are for looking):

    train/loss         the step's mean example loss (mean response-token NLL)
    train/lr           the step's learning rate
    train/grad_norm    the gradient norm before clipping (over the trained entries)
    train/tokens_per_s non-padding tokens per wall second, averaged over the run so far

TensorBoard event files go to ``<stage folder>/tensorboard/`` (offline; view with
``tensorboard --logdir RUN``). A resumed run starts a new event file whose ``purge_step`` is its first
step, so TensorBoard drops the steps the interrupted run logged after its last checkpoint and the curve
has each step once. Only the main rank writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

from dualsft import distributed as dist
from dualsft.errors import ConfigError

ReportTo = Literal["none", "tensorboard"]
REPORT_TO_HELP = ("where the per-step loss, lr, grad norm and tokens/s go besides metrics.jsonl: none, or "
                  "tensorboard (offline event files in <stage folder>/tensorboard/; needs "
                  "pip install \"dualsft[tensorboard]\")")
RESULT_NEUTRAL = "config.report_to"  # reporting never changes a result: never part of the metadata comparison


class Reporter(Protocol):
    """What the training loop reports to."""

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class NullReporter:
    """``--report-to none``: reports nothing."""

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReporter:
    """Event files under ``folder`` via ``torch.utils.tensorboard.SummaryWriter``.

    The writer is opened at the first ``log_scalars`` with ``purge_step`` = that step (1-based optimizer
    step): a rerun that resumes at step s+1 hides the interrupted run's events of steps >= s+1, and a run
    that starts over at step 1 hides all of them. Nothing touches the disk before that first call.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._summary_writer = import_summary_writer()
        self._writer = None

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            self._writer = self._summary_writer(log_dir=str(self.folder), purge_step=step)
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def import_summary_writer() -> type:
    """torch's SummaryWriter, or ConfigError saying how to install TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"--report-to tensorboard needs the tensorboard package ({e}); install it with "
                          "pip install \"dualsft[tensorboard]\" or use --report-to none") from e
    return SummaryWriter


def make_reporter(report_to: str, folder: str | Path) -> Reporter:
    """The reporter for ``--report-to`` writing under ``folder`` (a no-op one on ranks other than 0).
    Fails (ConfigError) at once when tensorboard is asked for and missing, on every rank alike, before any
    training (so no rank waits in a collective for one that failed)."""
    if report_to == "none":
        return NullReporter()
    if report_to != "tensorboard":
        raise ConfigError(f"--report-to {report_to!r}: use none or tensorboard")
    if not dist.is_main():
        import_summary_writer()
        return NullReporter()
    return TensorBoardReporter(folder)


def scalars_of(row: dict) -> dict[str, float]:
    """The reported scalars of one ``metrics.jsonl`` row (see the module docstring for the tags)."""
    return {"train/loss": float(row["loss"]), "train/lr": float(row["lr"]), "train/grad_norm": float(row["grad_norm"]),
            "train/tokens_per_s": row["tokens"] / max(row["time"], 1e-9)}
