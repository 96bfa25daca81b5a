"""Exact per-example gradient norms ‖g_n‖² over every tapped parameter, inside one batched backward
(docs/method.md §4 "Scoring variants": ``--data-score cosine`` and ``--target-gradient normalized``).

No per-example gradient of a weight matrix is formed. Each use of a weight by a module gives its
per-example gradient as a sum of outer products, g_n = Σ_t L_t R_tᵀ (one "factor" (L, R) per use):

    Linear   W [out, in]:   L = e (output gradient), R = a (input)
    Conv1D   W [in, out]:   L = a, R = e                      (GPT-2 stores the transpose)
    Embedding W [V, H]:     L = onehot(x) (kept as the ids x), R = e, zeroed at padding_idx tokens
                            (nn.Embedding gives the padding row no gradient)

and the inner product of two such gradients is a Gram identity over token pairs,

    ⟨Σ_t L_t R_tᵀ, Σ_s L'_s R'_sᵀ⟩ = Σ_{t,s} (L_t·L'_s)(R_t·R'_s)      cost T²(rows + cols) per example,

with onehot(x_t)·L'_s = L'_s[x_t] (a gather) and onehot(x_t)·onehot(x'_s) = [x_t = x'_s]. Vectors (norm
weights: Σ_t e_t ⊙ x̂_t; biases: Σ_t e_t) are formed per example ([B, D]: small). A weight used by several
modules (a TIED embedding / LM head) has ‖Σ_i g_i‖² = Σ_{i,j} ⟨g_i, g_j⟩: its uses are kept until the last
one arrives (or ``finish``), so the cross term 2⟨g_emb, g_head⟩ is included.
"""

from __future__ import annotations

import torch

# ("outer", L, R): g_n = Σ_t L_t R_tᵀ with L, R [B, T, ·] (or L the ids [B, T]); ("vector", g [B, D])
Factor = tuple


def gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, T, S] of the token-pair inner products a_t·b_s; an integer tensor [B, T] stands for one-hot rows."""
    ids_a, ids_b = not a.is_floating_point(), not b.is_floating_point()
    if ids_a and ids_b:
        return (a[:, :, None] == b[:, None, :]).double()
    if ids_a:
        return gram(b, a).transpose(1, 2)
    if ids_b:  # a_t · onehot(b_s) = a[t, b_s]
        return a.gather(2, b[:, None, :].expand(-1, a.shape[1], -1))
    return a @ b.transpose(1, 2)


def inner(f: Factor, g: Factor) -> torch.Tensor:
    """⟨g_n(f), g_n(g)⟩ for every example n: [B] float64."""
    if f[0] == "vector":
        return (f[1].double() * g[1].double()).sum(-1)
    return (gram(f[1], g[1]).double() * gram(f[2], g[2]).double()).sum((1, 2))


def weight_factor(kind: str, module: torch.nn.Module, x: torch.Tensor, e: torch.Tensor) -> Factor:
    """The per-example gradient of ``module.weight`` from its input (x̂ for a norm) and output gradient."""
    B = e.shape[0]
    if kind == "embedding":
        ids = x.reshape(B, -1)  # [B, T]
        e = e.reshape(B, ids.shape[1], -1)  # [B, T, H]
        if module.padding_idx is not None:
            e = e * ids.ne(module.padding_idx).unsqueeze(-1).to(e.dtype)
        return ("outer", ids, e)
    x = x.to(e.dtype).reshape(B, -1, x.shape[-1])  # [B, T, in]
    e = e.reshape(B, -1, e.shape[-1])  # [B, T, out]
    if kind == "affine_norm":
        return ("vector", (e * x).sum(1))
    return ("outer", x, e) if kind == "conv1d" else ("outer", e, x)


def bias_factor(e: torch.Tensor) -> Factor:
    """The per-example gradient of a bias: Σ_t e_t, [B, out]."""
    return ("vector", e.reshape(e.shape[0], -1, e.shape[-1]).sum(1))


class SquaredNorms:
    """Accumulates ‖g_n‖² (float64, [B]) over the parameters of ``uses`` ({parameter name: number of modules
    using it}) for the current batch; ``add`` each captured factor, ``finish`` after the backward."""

    def __init__(self, uses: dict[str, int]):
        self.uses = uses
        self.sq: torch.Tensor | None = None
        self.pending: dict[str, list[Factor]] = {}

    def reset(self, batch_size: int, device: torch.device) -> None:
        self.sq = torch.zeros(batch_size, dtype=torch.float64, device=device)
        self.pending = {}

    def add(self, name: str, factor: Factor) -> None:
        """One use's per-example gradient of parameter ``name``; a shared parameter waits for its other uses."""
        assert self.sq is not None, "call reset first"
        if self.uses.get(name, 1) == 1:
            self.sq += inner(factor, factor)
            return
        uses = self.pending.setdefault(name, [])
        uses.append(factor)
        if len(uses) == self.uses[name]:
            self._flush(name)

    def finish(self) -> torch.Tensor:
        """‖g_n‖² [B] once the backward is done (uses that never got a gradient add nothing)."""
        for key in list(self.pending):
            self._flush(key)
        assert self.sq is not None
        return self.sq

    def _flush(self, key: str) -> None:
        fs = self.pending.pop(key)
        for i, f in enumerate(fs):  # ‖Σ_i g_i‖² = Σ_i ‖g_i‖² + 2 Σ_{i<j} ⟨g_i, g_j⟩
            self.sq += inner(f, f)
            for g in fs[i + 1:]:
                self.sq += 2 * inner(f, g)
