"""The stability term v_prior = ∇L_prior(θ) (docs/method.md §3): KL to the base model θ0 on the anchor set A.

    L_prior(θ) = τ² · Σ_{i∈A} w_i KL_i(θ) / Z,    Z = Σ_i w_i  ("weighted_mean", default)
                                                  Z = max(Σ_i w_i, 1)  ("release": the authors' code)
    KL_i = mean over response tokens t of KL( softmax(f_θ0(t)/τ) || softmax(f_θ(t)/τ) )

Decisions (the paper is silent):
- the confidence w_i is computed from the SAME τ-softened teacher distribution p_t = softmax(f_θ0(t)/τ)
  that enters the KL: "max_prob" w_i = mean_t max_v p_t(v); "entropy_inv" w_i = 1/(1 + mean_t H(p_t));
  "uniform" w_i = 1.
- w_i depends on the teacher only, so it is a constant of θ: ∇L_prior = τ² Σ_i w_i ∇KL_i / Z.
- "response tokens" are the positions whose next token is a label (the same tokens l(z) averages over).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dualsft.errors import ConfigError
from dualsft.losses import IGNORE_INDEX, causal_lm_parts, check_plain_head, per_example_mean, response_positions
from dualsft.scoring.passes import BatchOut, Step, run_pass
from dualsft.scoring.progress import PassCheckpoint
from dualsft.scoring.stats import param_grads, zeros_like_params

CONFIDENCE_MODES = ("max_prob", "uniform", "entropy_inv")
NORMALISATIONS = ("weighted_mean", "release")
WEIGHT_SUM = "::weight_sum"  # the Σ_i w_i accumulator beside the per-parameter sums (no parameter has "::")


def _float(x: torch.Tensor) -> torch.Tensor:
    """Softmax maths in at least float32 (bf16/fp16 logits lose the small KL values)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] float mask of positions t whose NEXT token is a response label (after the causal shift)."""
    return labels[:, 1:].ne(IGNORE_INDEX)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(teacher/τ) || softmax(student/τ)) per position: [B, T, V] x2 -> [B, T]."""
    logq = F.log_softmax(_float(student_logits) / tau, dim=-1)
    logp = F.log_softmax(_float(teacher_logits) / tau, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def example_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               tau: float) -> torch.Tensor:
    """KL_i: mean over response tokens of the per-token KL. Logits [B, T, V], labels [B, T] -> [B]."""
    mask = response_mask(labels).to(_float(student_logits).dtype)
    kl = token_kl(student_logits[:, :-1], teacher_logits[:, :-1], tau)  # [B, T-1]
    return (kl * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def token_confidence(teacher_logits: torch.Tensor, tau: float, mode: str) -> torch.Tensor:
    """The per-token statistic w_i averages: max_v p_t(v) ("max_prob") or H(p_t) ("entropy_inv"), p_t the
    τ-softened teacher distribution; logits [..., V] -> [...]. ("uniform" needs none: ones.)"""
    if mode not in CONFIDENCE_MODES:
        raise ConfigError(f"--confidence must be one of {CONFIDENCE_MODES}, got {mode!r}")
    if mode == "uniform":
        return torch.ones(teacher_logits.shape[:-1], dtype=_float(teacher_logits).dtype, device=teacher_logits.device)
    logp = F.log_softmax(_float(teacher_logits) / tau, dim=-1)
    if mode == "max_prob":
        return logp.max(-1).values.exp()
    return -(logp.exp() * logp).sum(-1)


def weights_from_mean(mean_stat: torch.Tensor, mode: str) -> torch.Tensor:
    """w_i from the mean over its response tokens of ``token_confidence``: the mean itself, 1/(1 + mean
    entropy) ("entropy_inv"), or 1 ("uniform")."""
    if mode == "entropy_inv":
        return 1.0 / (1.0 + mean_stat)
    return torch.ones_like(mean_stat) if mode == "uniform" else mean_stat


def confidence_weights(teacher_logits: torch.Tensor, labels: torch.Tensor, tau: float, mode: str) -> torch.Tensor:
    """w_i per anchor example from the τ-softened teacher distribution (see module docstring). -> [B]."""
    mask = response_mask(labels).to(_float(teacher_logits).dtype)
    stat = token_confidence(teacher_logits[:, :-1], tau, mode)  # [B, T-1]
    return weights_from_mean((stat * mask).sum(-1) / mask.sum(-1).clamp_min(1.0), mode)


def prior_normaliser(weight_sum: float, normalisation: str) -> float:
    """Z: Σw ("weighted_mean") or max(Σw, 1) ("release"; then L_prior is not a weighted mean when Σw < 1)."""
    if normalisation == "weighted_mean":
        return weight_sum
    if normalisation == "release":
        return max(weight_sum, 1.0)
    raise ConfigError(f"--prior-normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")


def prior_gradient(model: torch.nn.Module, base_model: torch.nn.Module, anchor_batches: Iterable[dict],
                   params: Mapping[str, torch.nn.Parameter], tau: float = 2.0, confidence: str = "max_prob",
                   normalisation: str = "weighted_mean", acc_dtype: torch.dtype = torch.float32,
                   progress: object | None = None, loss_chunk: int = 0) -> dict[str, torch.Tensor]:
    """v_prior = ∇_θ L_prior(θ) at the student ``model`` (θw) with teacher ``base_model`` (θ0).

    One teacher forward (no grad) and one student forward+backward per anchor batch. Accumulates
    τ² Σ_i w_i ∇KL_i and Σ_i w_i, then divides by Z (``prior_normaliser``). Returns {name: tensor} in
    ``acc_dtype``, shaped like each parameter. Zero when the student equals the teacher (KL is minimal).
    """
    prior_normaliser(1.0, normalisation)  # validate the option before any compute
    acc, weight_sum = prior_gradient_sum(model, base_model, anchor_batches, params, tau, confidence, acc_dtype,
                                         progress, loss_chunk=loss_chunk)
    return normalise_prior(acc, weight_sum, normalisation)


def normalise_prior(acc: dict[str, torch.Tensor], weight_sum: float, normalisation: str) -> dict[str, torch.Tensor]:
    """v_prior = acc / Z from τ² Σ_i w_i ∇KL_i and Σ_i w_i over the WHOLE anchor set (summed over ranks first)."""
    z = prior_normaliser(weight_sum, normalisation)
    if z <= 0:
        raise ConfigError("the anchor confidence weights sum to 0: use --confidence uniform or more anchors")
    return {n: a / z for n, a in acc.items()}


def prior_accumulators(params: Mapping[str, torch.nn.Parameter], acc_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Zero sums of an anchor pass: τ² Σ_i w_i ∇KL_i per parameter (``acc_dtype``) and Σ_i w_i (float64)."""
    device = next(iter(params.values())).device
    return {**zeros_like_params(params, acc_dtype), WEIGHT_SUM: torch.zeros((), dtype=torch.float64, device=device)}


def chunked_kl_and_weights(model: torch.nn.Module, base_model: torch.nn.Module, batch: dict, tau: float,
                           confidence: str, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL_i [B] with its graph to the student, w_i [B]) as ``example_kl`` and ``confidence_weights`` give
    them, without any [B, T, V] logits: both models run to their last hidden states, the positions that
    predict a response token are kept, and the two heads, the KL and the teacher's confidence run ``chunk``
    positions at a time (the student's chunk under non-reentrant checkpointing: its logits are recomputed in
    the backward). Same values up to float rounding (tests/scoring/test_scoring_prior.py)."""
    check_plain_head(model)
    check_plain_head(base_model)
    (dec_s, head_s), (dec_t, head_t) = causal_lm_parts(model), causal_lm_parts(base_model)
    device = next(model.parameters()).device
    teacher_device = next(base_model.parameters()).device
    ids, att, labels = (batch[k] for k in ("input_ids", "attention_mask", "labels"))
    with torch.no_grad():
        h_t = dec_t(input_ids=ids.to(teacher_device), attention_mask=att.to(teacher_device),
                    use_cache=False).last_hidden_state
    h_s = dec_s(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False).last_hidden_state
    mask, rows, cols = response_positions(labels.to(device))
    hs, ht = h_s[:, :-1][rows, cols], h_t[:, :-1][rows.to(teacher_device), cols.to(teacher_device)]

    def teacher_logits(i: int) -> torch.Tensor:
        with torch.no_grad():
            return head_t(ht[i:i + chunk]).to(device)

    def chunk_kl(h: torch.Tensor, i: int) -> torch.Tensor:
        return token_kl(head_s(h), teacher_logits(i), tau)

    kl_parts, stat_parts = [], []
    for i in range(0, len(rows), chunk):
        kl_parts.append(checkpoint(chunk_kl, hs[i:i + chunk], i, use_reentrant=False))
        stat_parts.append(token_confidence(teacher_logits(i), tau, confidence))
    kl = per_example_mean(kl_parts, rows, mask, h_s)  # keeps the graph to the student
    stat = per_example_mean(stat_parts, rows, mask, h_s.detach())  # a constant of θ
    return kl, weights_from_mean(stat, confidence)


def prior_step(model: torch.nn.Module, base_model: torch.nn.Module, params: Mapping[str, torch.nn.Parameter],
               tau: float = 2.0, confidence: str = "max_prob", loss_chunk: int = 0) -> Step:
    """The per-batch function of an anchor pass: one teacher forward (θ0, no grad) and one student
    forward+backward (θw); adds τ² Σ_{i∈B} w_i ∇KL_i per parameter and Σ_{i∈B} w_i. ``loss_chunk`` > 0:
    heads, KL and confidence that many positions at a time (``chunked_kl_and_weights``)."""
    if tau <= 0:
        raise ConfigError(f"--tau must be positive, got {tau}")
    if confidence not in CONFIDENCE_MODES:
        raise ConfigError(f"--confidence must be one of {CONFIDENCE_MODES}, got {confidence!r}")
    device = next(iter(params.values())).device
    teacher_device = next(base_model.parameters()).device

    def full_logits(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ids, att, labels = (batch[k] for k in ("input_ids", "attention_mask", "labels"))
        with torch.no_grad():
            t_logits = base_model(input_ids=ids.to(teacher_device), attention_mask=att.to(teacher_device),
                                  use_cache=False).logits.to(device)
        s_logits = model(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False).logits
        labels = labels.to(device)
        return example_kl(s_logits, t_logits, labels, tau), confidence_weights(t_logits, labels, tau, confidence)

    def step(batch: dict) -> BatchOut:
        ids = batch["input_ids"]
        kl, w = (chunked_kl_and_weights(model, base_model, batch, tau, confidence, loss_chunk) if loss_chunk > 0
                 else full_logits(batch))  # [B] each; w is a constant of θ
        sums = param_grads(params, tau**2 * (w * kl).sum())
        return BatchOut(int(ids.shape[0]), sums={**sums, WEIGHT_SUM: w.sum().double()})

    return step


def split_prior_sums(sums: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """(τ² Σ_i w_i ∇KL_i per parameter, Σ_i w_i) from an anchor pass's sums."""
    return {n: t for n, t in sums.items() if n != WEIGHT_SUM}, float(sums[WEIGHT_SUM])


def prior_gradient_sum(model: torch.nn.Module, base_model: torch.nn.Module, anchor_batches: Iterable[dict],
                       params: Mapping[str, torch.nn.Parameter], tau: float = 2.0, confidence: str = "max_prob",
                       acc_dtype: torch.dtype = torch.float32,
                       progress: object | None = None,
                       checkpoint: PassCheckpoint | None = None,
                       loss_chunk: int = 0) -> tuple[dict[str, torch.Tensor], float]:
    """(τ² Σ_i w_i ∇KL_i per parameter, Σ_i w_i) over ``anchor_batches``, not yet divided by Z: sums over
    shards of the anchor set add up (data parallelism), the normalisation must see the global Σw.
    ``checkpoint`` (scoring/progress.py) resumes from / saves the partial sums every few batches."""
    res = run_pass(anchor_batches, prior_step(model, base_model, params, tau, confidence, loss_chunk),
                   prior_accumulators(params, acc_dtype), progress, checkpoint)
    return split_prior_sums(res.sums)
