"""The options of `dualsft score` (``ScoreConfig``) and the settings the scores were made with, saved
beside them as RUN/scores/settings.json.

One typed record (``ScoringSettings``) written by `dualsft score` and read back by every later stage that
recomputes part of the method (joint refinement, the surrogate I(m, S)): η and the order of u, the λs and
the prior's options, and how the text was tokenised. It has no defaults of its own: `dualsft score`'s
``ScoreConfig`` is the one place the defaults are typed; the record is built from it (and, for scores made
before settings.json existed, from the config their metadata.json records, over those defaults).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from dualsft.config import UNRECORDED_SCORE, CommonConfig, opt, require
from dualsft.io import write_json

SETTINGS_FILE = "settings.json"
PRECONDITIONS = ("auto", "none", "adam", "adam-step")


@dataclass(frozen=True)
class ScoreConfig(CommonConfig):
    """Options of `dualsft score` (docs/method.md §3-§5). The scoring formula defaults to LESS's form of the
    DualSFT scores (Adam-step u when the warm-up's c exists, φ_data over the linear layers, cosine ranking,
    normalized target gradient; docs/method.md §4 "Defaults of the scores"); the paper's formula is
    ``--preset release`` (dualsft.config.PAPER_SCORE)."""

    pool: str = opt("", "pool data (the examples to score): a file, a saved dataset FOLDER[@split] or "
                        "hf://owner/name[:config][@split], each optionally ?prompt=COL&response=COL")
    target: str = opt("", "target/validation data V (v_new is built from its gradients); spellings as --pool")
    order: int = opt(2, "2: u = ηv − ½η²c⊙G (needs the warm-up's curvature); 1: u = ηv (one pool pass)")
    eta: float = opt(2e-5, "η, the step size of the one-step surrogate")
    lambda_new: float = opt(1.0, "λ_new, weight of the target loss in L_val")
    lambda_prior: float = opt(0.2, "λ_prior, weight of the KL-to-base term in L_val (0 skips the anchor pass)")
    tau: float = opt(2.0, "τ, the KL temperature")
    confidence: Literal["max_prob", "uniform", "entropy_inv"] = opt("max_prob", "anchor weight w_i")
    prior_normalisation: Literal["weighted_mean", "release"] = opt(
        "weighted_mean", "divide by Σw (weighted mean) or by max(Σw, 1) as the authors' release does")
    anchor_ratio: float = opt(0.02, "fraction of the pool used as the anchor set A (seeded)")
    batch_size: int = opt(4, "examples per scoring batch")
    method: Literal["ghost", "jvp", "exact"] = opt(
        "ghost", "row scores: ghost (hooks), jvp (forward-mode, generic; no per-example norms, so it needs "
        "--data-score inner), exact (one backward per example; slow)")
    curvature: str = opt("", "safetensors file of c per parameter (default: RUN/warmup/exp_avg_sq.safetensors)")
    stats_dtype: Literal["float32", "float64"] = opt("float32", "dtype of the G / v / u accumulators")
    # the scoring formula (docs/method.md §4 "Scoring variants", "Defaults of the scores"): the defaults are LESS's
    # form; --preset release sets the paper's (precondition none, data_params all, data_score inner, mean target)
    score_tokens: Literal["response", "answer"] = opt(
        "response", "tokens whose loss the SCORING passes use (target, anchors, pool): response = every "
        "response token the template trains (with the chat template's end-of-turn tokens); answer = the "
        "answer's own tokens only. Training is unaffected")
    data_score: Literal["inner", "cosine"] = opt(
        "cosine", "φ_data ranking score: cosine (default) = ⟨u, g_n⟩ / ‖g_n‖ with exact per-example gradient "
        "norms over all trainable parameters (needs --method ghost or exact); inner = ⟨u, g_n⟩ (the paper's)")
    target_gradient: Literal["mean", "normalized"] = opt(
        "normalized", "v_new: mean = mean target gradient (the paper's); normalized (default) = (mean_q ‖g_q‖) · "
        "mean_q g_q/‖g_q‖, LESS's normalised direction RESCALED to the mean gradient's typical size so that "
        "λ_prior keeps its meaning (unscaled it is ~30x smaller than v_prior on SmolLM2 and the prior takes over); "
        "one extra target pass for ‖g_q‖ (by the ghost hooks, also under --method jvp; exact's with --method exact)")
    precondition: Literal["auto", "none", "adam", "adam-step"] = opt(
        "auto", "u: none = the paper's (an SGD step); adam = Adam's step: u = P⊙(ηv − ½η²c⊙P⊙G), P = 1/(√c + ε) "
        "from the warm-up's exp_avg_sq, as LESS preconditions its gradients; adam-step = the same with "
        "P = 1/(√(β2·c + (1−β2)·v²) + ε), the step v itself would take (bounded where the warm-up never moved a "
        "coordinate, c ≈ 0); both need the warm-up's c, any order; auto (default) = adam-step when c exists (a "
        "warm-up checkpoint or --curvature), else none (at θ0 there is no c); the value used is logged and "
        "recorded in summary.json and settings.json")
    data_params: Literal["all", "linear"] = opt(
        "linear", "parameters φ_data sums over: linear (default) = the transformer's linear layers only (no "
        "embeddings, tied or untied output head, norms), as LESS's features; all = every trainable one (the "
        "paper); φ_param keeps every parameter")
    loss_chunk: int = opt(0, "anchor pass (v_prior) only: both LM heads, the KL and the teacher's confidence on the "
                             "response positions only, N at a time, the student's recomputed in the backward (no "
                             "[batch, length, vocab] logits); 0 = full logits. Same v_prior up to float rounding")
    checkpoint_every: int = opt(50, "save each pass's partial sums every N batches to RUN/scores/progress/, "
                                "so a rerun resumes after a kill (0: off)")
    sharding: Literal["auto", "none", "fsdp"] = opt(
        "auto", "fsdp: shard θw, the teacher θ0 and every statistic (v, c, G, u, φ_param) across the torchrun "
        "processes with FSDP2; each layer's u is gathered with its weights for the row scores (--method ghost "
        "only); none: data parallel, every rank holds everything; auto (default): fsdp with more than one "
        "process for --method ghost without --loss-chunk, else none")
    gradient_checkpointing: bool = opt(False, "recompute each decoder layer's activations in the backward of "
                                              "every pass (non-reentrant, the model stays in eval mode): less "
                                              "activation memory, the same scores; --method ghost or exact")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.order in (1, 2), "order", self.order, "use 1 or 2")
        require(self.eta > 0, "eta", self.eta, "must be positive")
        require(self.tau > 0, "tau", self.tau, "must be positive")
        require(self.lambda_new >= 0, "lambda-new", self.lambda_new, "a weight is >= 0")
        require(self.lambda_prior >= 0, "lambda-prior", self.lambda_prior, "a weight is >= 0")
        require(0 <= self.anchor_ratio <= 1, "anchor-ratio", self.anchor_ratio, "a fraction of the pool in [0, 1]")
        require(self.batch_size >= 1, "batch-size", self.batch_size, "must be at least 1")
        require(self.loss_chunk >= 0, "loss-chunk", self.loss_chunk, "positions per chunk, or 0 for full logits")
        require(self.score_tokens in ("response", "answer"), "score-tokens", self.score_tokens, "use response or answer")
        require(self.data_score in ("inner", "cosine"), "data-score", self.data_score, "use inner or cosine")
        require(self.target_gradient in ("mean", "normalized"), "target-gradient", self.target_gradient,
                "use mean or normalized")
        require(self.precondition in PRECONDITIONS, "precondition", self.precondition,
                "use auto, none, adam or adam-step")
        require(self.data_params in ("all", "linear"), "data-params", self.data_params, "use all or linear")
        require(self.sharding in ("auto", "none", "fsdp"), "sharding", self.sharding, "use auto, none or fsdp")
        blocker = self.scoring_blocker()  # the one list of what FSDP2 scoring does not run (auto falls back)
        require(not (self.sharding == "fsdp" and blocker), "sharding", self.sharding,
                f"FSDP2 scoring does not support {blocker} (rows need --method ghost; --loss-chunk calls the "
                "decoder and head apart from FSDP's hooks): use --sharding none, or auto")
        # the default ranking divides by ‖g_n‖, which forward mode cannot give: say so instead of falling back
        require(not (self.data_score == "cosine" and self.method == "jvp"), "data-score", self.data_score,
                "cosine (the default ranking) divides by per-example gradient norms, which --method jvp cannot "
                "compute: pass --data-score inner to score with jvp (the paper's ⟨u, g_n⟩ ranking), or use "
                "--method ghost (default) or exact")
        # jvp's dual-number forward saves tensors that a recompute in the backward (outside the dual level)
        # does not save again: torch.utils.checkpoint raises CheckpointError (tried: order 1 with G)
        require(not (self.gradient_checkpointing and self.method == "jvp"), "method", self.method,
                "--gradient-checkpointing cannot recompute --method jvp's forward-mode (dual-number) pass: use "
                "--method ghost (default) or exact, or drop the flag")

    def scoring_blocker(self) -> str | None:
        """Why this scoring run cannot shard with FSDP2 (``--sharding auto`` then runs data parallel), or None."""
        if self.method != "ghost":
            return f"--method {self.method}"
        return "--loss-chunk" if self.loss_chunk else None


def resolve_precondition(requested: str, curvature_file: str | None) -> str:
    """The preconditioner u is built with: ``--precondition auto`` is "adam-step" when the warm-up's Adam second
    moment c exists (``curvature_file``: the warm-up's exp_avg_sq or --curvature), else "none" (scoring at θ0
    has no c); an explicit value is kept (adam / adam-step without c are refused where c is loaded)."""
    if requested != "auto":
        return requested
    return "adam-step" if curvature_file else "none"


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
    score_tokens: str          # scoring variants (docs/method.md §4): response | answer
    data_score: str            # inner | cosine
    target_gradient: str       # mean | normalized
    precondition: str          # none | adam | adam-step (as used: `auto` resolved by resolve_precondition)
    data_params: str           # all | linear
    assistant_turns: str       # chat records: last | all assistant turns carry loss

    @classmethod
    def from_config(cls, cfg: Any, scored_at: str) -> ScoringSettings:
        """The record of a `dualsft score` config (any object with these attribute names)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if f.name != "scored_at"},
                   scored_at=scored_at)


def save_settings(scores_dir: str | Path, settings: ScoringSettings) -> None:
    """Write RUN/scores/settings.json (atomically)."""
    write_json(Path(scores_dir) / SETTINGS_FILE, asdict(settings))


def load_settings(scores_dir: str | Path) -> ScoringSettings:
    """The settings of RUN/scores: settings.json, or (scores made before it existed) what metadata.json
    records, with `dualsft score`'s defaults for fields it lacks and its model id for the model."""
    folder = Path(scores_dir)
    path = folder / SETTINGS_FILE
    if path.exists():
        # fields added later (the scoring variants) take what those scores were made with (the paper's
        # formula, UNRECORDED_SCORE), other missing fields `dualsft score`'s defaults
        defaults = {**asdict(ScoreConfig()), **UNRECORDED_SCORE}
        saved = json.loads(path.read_text())
        return ScoringSettings(**{f.name: saved.get(f.name, defaults.get(f.name)) for f in fields(ScoringSettings)})
    meta = json.loads((folder / "metadata.json").read_text())
    return ScoringSettings(**_from_metadata(meta))


def _from_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """ScoringSettings fields from a scores metadata.json (its config over ScoreConfig's defaults, the scoring
    formula's over the paper's: such scores predate both the options and the change of default)."""
    defaults = {**asdict(ScoreConfig()), **UNRECORDED_SCORE}
    config = {**defaults, "model": (meta.get("model") or {}).get("id") or defaults["model"],
              **(meta.get("config") or {})}
    names = [f.name for f in fields(ScoringSettings) if f.name != "scored_at"]
    return {**{n: config[n] for n in names}, "scored_at": meta.get("scored_at") or "unrecorded"}
