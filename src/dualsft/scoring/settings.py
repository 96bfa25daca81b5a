"""The settings the scores were made with, saved beside them as RUN/scores/settings.json.

One typed record (``ScoringSettings``) written by `dualsft score` and read back by every later stage that
recomputes part of the method (joint refinement, the surrogate I(m, S)): η and the order of u, the λs and
the prior's options, and how the text was tokenised. It has no defaults of its own: `dualsft score`'s
``ScoreConfig`` is the one place the defaults are typed, and the record is built from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from dualsft.errors import ArtifactError
from dualsft.io import write_json

SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class ScoringSettings:
    """What the saved scores (u, v, φ_param, φ_data) depend on (docs/method.md §3-§5)."""

    model: str                 # the model id the run was scored from (θ0's; θw is RUN/warmup's)
    scored_at: str             # "theta_w" (after the warm-up) or "theta_0"
    order: int                 # 2: u = ηv − ½η²c⊙G; 1: u = ηv
    eta: float                 # η
    lambda_new: float          # λ_new
    lambda_prior: float        # λ_prior
    tau: float                 # τ of the KL
    confidence: str            # w_i: max_prob | uniform | entropy_inv
    prior_normalisation: str   # weighted_mean | release
    anchor_ratio: float        # |A| / N
    template: str              # chat | plain
    max_length: int            # tokens per example
    drop_empty: bool           # examples without response tokens dropped
    method: str                # row scores: ghost | jvp | exact
    stats_dtype: str           # float32 | float64 accumulators
    seed: int

    @classmethod
    def from_config(cls, cfg: Any, scored_at: str) -> ScoringSettings:
        """The record of a `dualsft score` config (any object with these attribute names)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if f.name != "scored_at"},
                   scored_at=scored_at)


def save_settings(scores_dir: str | Path, settings: ScoringSettings) -> None:
    """Write RUN/scores/settings.json (atomically)."""
    write_json(Path(scores_dir) / SETTINGS_FILE, asdict(settings))


def load_settings(scores_dir: str | Path) -> ScoringSettings:
    """The settings of RUN/scores: settings.json, or (scores made before it existed) the config and
    scored_at recorded in metadata.json. Raises ArtifactError naming a missing field."""
    folder = Path(scores_dir)
    path = folder / SETTINGS_FILE
    if path.exists():
        record = json.loads(path.read_text())
    else:
        meta = json.loads((folder / "metadata.json").read_text())
        record = {**(meta.get("config") or {}), "scored_at": meta.get("scored_at")}
        path = folder / "metadata.json"
    names = [f.name for f in fields(ScoringSettings)]
    missing = [n for n in names if record.get(n) is None]
    if missing:
        raise ArtifactError(f"{path} records no {missing}; rerun `dualsft score` to record the scoring settings")
    return ScoringSettings(**{n: record[n] for n in names})
