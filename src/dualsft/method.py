"""The maths of DualSFT on per-parameter statistics (docs/method.md §3-§4, §7), as pure functions.

Every statistic is a ``dict[str, Tensor]`` keyed by parameter name and shaped like the parameter:
v_new, v_prior (target and prior gradients), v, G = Σ_n g_n (or G_S over a subset S), c (Adam's raw
exp_avg_sq), u, φ_param. No paths, no logging, no devices chosen here: tensors stay where they are given.

    v        = λ_new v_new + λ_prior v_prior                     combine_v
    u        = η v − ½ η² c ⊙ G   (order 2)   /   η v (order 1)  u_tensor (the ONE place), direction_u
    φ_param  = u ⊙ G                                              param_scores (float32), interaction (float64)
    t(S)     = u(S) ⊙ G_S,   u(S) = η v − ½ η² c ⊙ G_S           subset_term (joint refinement's ranking)
    I(m, S)  = Σ_j m_j t_j(S) = η vᵀ(m⊙G_S) − ½η² Σ_j m_j c_j G_Sj²    surrogate_improvement
Scoring variants (docs/method.md §4 "Scoring variants"):
    φ_data cosine = ⟨u, g_n⟩ / ‖g_n‖                                cosine_scores
    u adam = P ⊙ (η v − ½ η² c ⊙ P ⊙ G),  P = 1/(√c + ε)            adam_scale, u_tensor(p=P)
    u adam-step: the same with P = 1/(√(β2 c + (1−β2) v²) + ε)        adam_step_scale
    φ_data linear = ⟨u_R, g_n⟩, R = the linear layers' entries      restrict
    v_new normalized = (mean_q ‖g_q‖) · mean_q g_q/‖g_q‖ = Σ_q w_q g_q   normalized_target_weights
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dualsft.errors import ConfigError

ParamDict = dict[str, torch.Tensor]
ORDERS = (1, 2)


def check_order(order: int) -> None:
    """Raise ConfigError unless ``order`` is 1 (u = ηv) or 2 (u = ηv − ½η²c⊙G)."""
    if order not in ORDERS:
        raise ConfigError(f"--order must be 1 or 2, got {order}")


def combine_v(v_new: Mapping[str, torch.Tensor], v_prior: Mapping[str, torch.Tensor] | None, lambda_new: float,
              lambda_prior: float) -> ParamDict:
    """v = λ_new v_new + λ_prior v_prior (docs/method.md §4), in v_new's dtype.

    ``v_prior`` None (or λ_prior = 0) means the anchor pass was skipped: v = λ_new v_new."""
    with_prior = v_prior is not None and lambda_prior != 0
    return {n: lambda_new * vn + (lambda_prior * v_prior[n] if with_prior else torch.zeros_like(vn))  # type: ignore[index]
            for n, vn in v_new.items()}


def curvature_term(c: torch.Tensor, G: torch.Tensor, eta: float, like: torch.Tensor) -> torch.Tensor:
    """½ η² c ⊙ G for one parameter, in ``like``'s dtype and device (the second-order part of u)."""
    return 0.5 * eta**2 * c.to(like) * G.to(like)


def u_tensor(v: torch.Tensor, eta: float, c: torch.Tensor | None = None, G: torch.Tensor | None = None,
             dtype: torch.dtype | None = None, p: torch.Tensor | None = None) -> torch.Tensor:
    """u = η v − ½ η² c ⊙ G for one parameter (η v when ``c`` or ``G`` is None), in ``dtype`` (default v's).

    With an Adam preconditioner ``p`` (the ``--score.precondition adam`` variant) the one step is Adam's,
    Δθ = −η P ⊙ G, and u = P ⊙ (η v − ½ η² c ⊙ P ⊙ G): then still Σ_n ⟨u, g_n⟩ = uᵀG = the one-step
    surrogate. This is the only place the formula of u is written (docs/method.md §4)."""
    u = eta * (v if dtype is None else v.to(dtype))
    if c is not None and G is not None:
        u = u - curvature_term(c, G if p is None else p.to(G) * G, eta, u)
    return u if p is None else p.to(u) * u


def adam_scale(c: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """P = 1/(√c + ε) for one parameter from Adam's raw exp_avg_sq c (float64): the diagonal scaling of an
    Adam step, as LESS preconditions training gradients. Adam's bias correction divides c by one number
    (1 − β2^t), which rescales every P alike (rankings unchanged) apart from ε's weight; it is not applied."""
    return 1.0 / (c.double().clamp_min(0).sqrt() + eps)


def adam_step_scale(c: torch.Tensor, v: torch.Tensor, beta2: float = 0.999, eps: float = 1e-8) -> torch.Tensor:
    """P = 1/(√(β2 c + (1 − β2) v²) + ε) for one parameter (float64): the denominator of the Adam step that
    the target direction v itself would take from the warm-up's raw exp_avg_sq c (the ``adam-step`` variant,
    docs/method.md §4). As in LESS's simulated step, the new gradient enters its own second moment, so a
    coordinate the warm-up never moved (c ≈ 0) gets P ≈ 1/(√(1 − β2)|v|), at most ~31.6 η per unit of u,
    instead of 1/ε as in ``adam_scale``. No bias correction (LESS's rule too)."""
    second = beta2 * c.double().clamp_min(0) + (1 - beta2) * v.double().to(c.device).pow(2)
    return 1.0 / (second.sqrt() + eps)


PRECONDITIONS = ("none", "adam", "adam-step")


def restrict(u: Mapping[str, torch.Tensor], names: list[str]) -> ParamDict:
    """u on the named parameters only (the others count as 0): φ_data = ⟨u_R, g_n⟩ over R = ``names``, and
    then Σ_n φ_data[n] = Σ_{j ∈ R} φ_param_j (the row–column identity restricted to R)."""
    missing = [n for n in names if n not in u]
    if missing:
        raise ConfigError(f"no u for {missing[:3]} ({len(missing)} parameters)")
    return {n: u[n] for n in names}


def direction_u(v: Mapping[str, torch.Tensor], eta: float, order: int, c: Mapping[str, torch.Tensor] | None = None,
                G: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                precondition: str = "none") -> ParamDict:
    """u per parameter (docs/method.md §4): η v (order 1) or η v − ½ η² c ⊙ G (order 2, needs c and G);
    with ``precondition`` "adam" or "adam-step" the Adam-step form of ``u_tensor``, P = ``adam_scale(c)``
    or ``adam_step_scale(c, v)``, made one parameter at a time (needs c at either order; no second copy of c
    is held).

    A parameter missing from ``c`` has no curvature estimate: its second-order term is 0 (see
    ``missing_curvature``). With G = G_S (a subset's gradient sum) this is u(S) of joint refinement."""
    check_order(order)
    if order == 2 and (G is None or c is None):
        raise ConfigError("order 2 needs both G and the curvature c (Adam exp_avg_sq from the warm-up)")
    if precondition not in PRECONDITIONS:
        raise ConfigError(f"--precondition must be one of {PRECONDITIONS}, got {precondition!r}")
    if precondition != "none" and (c is None or set(v) - set(c)):
        missing = sorted(set(v) - set(c or {}))[:3]
        raise ConfigError(f"--precondition {precondition} needs c for every scored parameter; missing {missing}")

    def p(n: str) -> torch.Tensor | None:
        if precondition == "adam":
            return adam_scale(c[n])  # type: ignore[index]
        return adam_step_scale(c[n], v[n]) if precondition == "adam-step" else None  # type: ignore[index]

    if order == 1:
        return {n: u_tensor(vn, eta, dtype=dtype, p=p(n)) for n, vn in v.items()}
    return {n: u_tensor(vn, eta, c.get(n), G[n], dtype, p(n)) for n, vn in v.items()}  # type: ignore[union-attr,index]


def missing_curvature(v: Mapping[str, torch.Tensor], c: Mapping[str, torch.Tensor] | None) -> list[str]:
    """Names of ``v`` that ``c`` has no entry for (their second-order term is taken as 0)."""
    return [] if c is None else [n for n in v if n not in c]


def interaction(u: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """u ⊙ G for one parameter in float64: the column sums Σ_n M[n, j] of the interaction matrix."""
    return u.double() * G.double().to(u.device)


def param_scores(u: Mapping[str, torch.Tensor], G: Mapping[str, torch.Tensor]) -> ParamDict:
    """φ_param = u ⊙ G per parameter (docs/method.md §4), float32 (computed in float64)."""
    return {n: interaction(u[n], G[n]).float() for n in u}


def subset_term(v: Mapping[str, torch.Tensor], c: Mapping[str, torch.Tensor] | None,
                G_S: Mapping[str, torch.Tensor], eta: float) -> ParamDict:
    """t(S) = u(S) ⊙ G_S per entry, float64 (docs/method.md §7): η v_j G_Sj − ½ η² c_j G_Sj².

    φ_param computed on the subset S; Σ_j m_j t_j(S) = I(m, S), so top-k of t maximises I over masks of
    size k. ``c`` None: first order (η v_j G_Sj)."""
    return {n: _entry_term(v[n], c, n, g, eta) for n, g in G_S.items()}


def _entry_term(v: torch.Tensor, c: Mapping[str, torch.Tensor] | None, name: str, G_S: torch.Tensor,
                eta: float) -> torch.Tensor:
    """t_j(S) for one parameter [shape of the parameter], float64."""
    g = G_S.double()
    curv = c.get(name) if c is not None else None
    return interaction(u_tensor(v.to(g.device), eta, curv, g, torch.float64), g)


def surrogate_improvement(v: Mapping[str, torch.Tensor], c: Mapping[str, torch.Tensor] | None,
                          G_S: Mapping[str, torch.Tensor], mask_bool_dict: Mapping[str, torch.Tensor],
                          eta: float) -> float:
    """I(m, S) = Σ_j m_j t_j(S) = η vᵀ(m ⊙ G_S) − ½ η² Σ_j m_j c_j (G_S)_j²  (docs/method.md §3), float64.

    ``mask_bool_dict`` maps names to bool masks shaped like the parameter; a name absent from it is
    entirely unselected. ``c`` None: first-order surrogate. Names absent from ``v``/``G_S`` add nothing."""
    total = 0.0
    for n, m in mask_bool_dict.items():
        if n in v and n in G_S:
            t = _entry_term(v[n], c, n, G_S[n], eta)
            total += float(t[m.to(t.device)].sum())
    return total


def u_term_norms(v_new: Mapping[str, torch.Tensor], v_prior: Mapping[str, torch.Tensor] | None,
                 c: Mapping[str, torch.Tensor] | None, G: Mapping[str, torch.Tensor] | None,
                 u: Mapping[str, torch.Tensor], eta: float, lambda_new: float, lambda_prior: float,
                 order: int) -> dict[str, float]:
    """l2 norms of the terms of u over all parameters (docs/method.md §4: which terms matter at this scale):
    η·λ_new·v_new, η·λ_prior·v_prior, ½η²·c⊙G (order 2; 0 where c is missing) and u itself."""
    sq = {"eta_lambda_new_v_new": 0.0, "eta_lambda_prior_v_prior": 0.0, "half_eta2_c_G": 0.0, "u": 0.0}
    for n, vn in v_new.items():
        sq["eta_lambda_new_v_new"] += _sq(eta * (lambda_new * vn))
        if v_prior is not None and lambda_prior:
            sq["eta_lambda_prior_v_prior"] += _sq(eta * (lambda_prior * v_prior[n]))
        if order == 2 and c is not None and G is not None and n in c:
            sq["half_eta2_c_G"] += _sq(curvature_term(c[n], G[n], eta, u[n]))
        sq["u"] += _sq(u[n])
    return {k: s**0.5 for k, s in sq.items()}


def _sq(t: torch.Tensor) -> float:
    """‖t‖² in float64."""
    return float(t.double().pow(2).sum())


def combine_u(v_new: Mapping[str, torch.Tensor], v_prior: Mapping[str, torch.Tensor] | None,
              G: Mapping[str, torch.Tensor] | None, c: Mapping[str, torch.Tensor] | None, eta: float,
              lambda_new: float, lambda_prior: float, order: int,
              precondition: str = "none") -> tuple[ParamDict, ParamDict, dict[str, float]]:
    """(u, v, term norms) from the scoring statistics: ``combine_v``, then ``direction_u``, then
    ``u_term_norms`` (docs/method.md §4; the norms are of the unpreconditioned terms)."""
    check_order(order)
    v = combine_v(v_new, v_prior, lambda_new, lambda_prior)
    u = direction_u(v, eta, order, c, G, precondition=precondition)
    return u, v, u_term_norms(v_new, v_prior, c, G, u, eta, lambda_new, lambda_prior, order)


def cosine_scores(inner: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """φ_data cosine [N] = ⟨u, g_n⟩ / ‖g_n‖ from the inner scores [N] and ‖g_n‖² [N] (0 where g_n = 0)."""
    norms = sq_norms.double().clamp_min(0).sqrt()
    return torch.where(norms > 0, inner.double() / norms.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.zeros_like(norms))


def normalized_target_weights(norms: torch.Tensor) -> torch.Tensor:
    """w_q [Q] with Σ_q w_q g_q = (mean_q ‖g_q‖) · mean_q g_q/‖g_q‖ (the normalized v_new): LESS's direction
    of unit-normalised target gradients, rescaled to the mean gradient's typical size so that λ_prior keeps
    its meaning (unscaled, it is ~30x smaller than v_prior on SmolLM2). ``norms``: ‖g_q‖ [Q], all > 0."""
    norms = norms.double()
    if not bool((norms > 0).all()):
        raise ConfigError("--target-gradient normalized: a target example has a zero gradient (‖g_q‖ = 0); "
                          "drop it or use --target-gradient mean")
    return norms.mean() / (len(norms) * norms)
