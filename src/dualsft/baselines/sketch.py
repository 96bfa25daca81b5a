"""A seeded random projection R^d -> R^k for per-example gradients that never forms a d×k matrix.

"Sign-fold CountSketch" (our choice; TRAK's dense Rademacher projector would need d×k = 10^12 entries at
135M parameters and 8192 dims, and a plain CountSketch's random scatter costs ~30 ns per entry on CPU):

    stage 1, per parameter tensor l (flat entries p = 0..D_l-1 cut into blocks j of s entries):
        z[(r + o_l) mod s] += Σ_j κ_l[j] · x_l[j·s + r]     κ_l ∈ {±1}^{#blocks} seeded per (seed, name),
                                                            o_l a seeded offset, s the first prime ≥ 8k
        (a "fold": one read of x, as a matrix-vector product; no scatter over d)
    stage 2, once per batch:  y[h(r)] += τ[r] · z[r]      h: [s] -> [k], τ ∈ {±1}^s seeded (a CountSketch)

Together y = P x with P a {0, ±1} matrix with ONE nonzero per column (entry (l, p) goes to bucket
h((p mod s + o_l) mod s) with sign κ_l[p div s]·τ[...]). Two distinct entries that share a bucket always
carry a product of signs with mean zero (different blocks or tensors: independent κ; different residues:
independent τ), so E⟨Px, Py⟩ = ⟨x, y⟩ exactly, and for vectors without structure of period s (s is a prime
unrelated to any layer shape) the variance is that of a CountSketch with k buckets plus one with s:
Var ≈ (‖x‖²‖y‖² + ⟨x,y⟩²)(1/k + 1/s). A cosine is preserved to about sqrt((1 + cos²)/k) (≈ 0.013 at
k = 8192). The prime fold keeps rows (consecutive entries) and columns (stride = in, coprime to s) of a
weight matrix apart, and the per-tensor offset o_l keeps the same structured entries of different layers
(e.g. one outlier hidden dimension) apart. Determinism: a pure function of (seed, parameter name, flat
position), independent of batch size, device and the order of layers.
"""

from __future__ import annotations

import zlib

import torch


def next_prime(n: int) -> int:
    """Smallest prime ≥ n (trial division; n is at most a few 10^5 here)."""
    def is_prime(m: int) -> bool:
        if m < 2:
            return False
        i = 2
        while i * i <= m:
            if m % i == 0:
                return False
            i += 1
        return True

    while not is_prime(n):
        n += 1
    return n


def _generator(seed: int, tag: str) -> torch.Generator:
    """A CPU generator seeded by a stable hash of (seed, tag) (Python's hash() is salted per process)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{tag}".encode()))


class SignFoldSketch:
    """Seeded JL projection to ``dim`` coordinates (see module docstring).

    Use: ``z = sk.new_buffer(B, dtype, device)``; ``sk.add(z, name, x)`` for each parameter's per-example
    values x [B, D_name] (flat order of the parameter); ``y = sk.finish(z)`` -> [B, dim].
    """

    def __init__(self, dim: int, seed: int = 0, fold: int | None = None):
        if dim < 1:
            raise ValueError(f"projection dim must be ≥ 1, got {dim}")
        self.dim, self.seed = dim, seed
        self.fold = fold or next_prime(8 * dim)
        g = _generator(seed, "stage2")
        self.bucket = torch.randint(0, dim, (self.fold,), generator=g)  # h  [s]
        self.sign = torch.randint(0, 2, (self.fold,), generator=g).mul_(2).sub_(1)  # τ  [s]

    def block_signs(self, name: str, numel: int) -> tuple[torch.Tensor, int]:
        """(κ_name [#blocks] ±1 float64, offset o_name): a pure function of (seed, name, numel)."""
        g = _generator(self.seed, f"param:{name}")
        off = int(torch.randint(0, self.fold, (1,), generator=g))
        kappa = torch.randint(0, 2, (-(-numel // self.fold),), generator=g, dtype=torch.float64).mul_(2).sub_(1)
        return kappa, off

    def new_buffer(self, batch: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """A zero stage-1 accumulator z [B, s]."""
        return torch.zeros(batch, self.fold, dtype=dtype, device=device)

    def add(self, z: torch.Tensor, name: str, x: torch.Tensor) -> None:
        """z += fold_κ(x) shifted by o_name.   x: [B, D] in the parameter's flat order (read once)."""
        B, D = x.shape
        s = self.fold
        kappa, off = self.block_signs(name, D)
        kappa = kappa.to(device=z.device, dtype=z.dtype)
        full, rem = divmod(D, s)
        x = x.to(z.dtype)
        folded = torch.zeros(B, s, dtype=z.dtype, device=z.device)
        if full:
            folded += torch.matmul(kappa[:full], x[:, : full * s].reshape(B, full, s))  # [B, s]
        if rem:
            folded[:, :rem] += kappa[full] * x[:, full * s:]
        z += torch.roll(folded, shifts=off, dims=1)

    def finish(self, z: torch.Tensor) -> torch.Tensor:
        """Stage 2: y [B, dim] from z [B, s]."""
        y = torch.zeros(z.shape[0], self.dim, dtype=z.dtype, device=z.device)
        y.index_add_(1, self.bucket.to(z.device), z * self.sign.to(device=z.device, dtype=z.dtype))
        return y

    def project(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Convenience: P x for x given as {name: [B, D_name]} -> [B, dim] (tests, small inputs)."""
        first = next(iter(parts.values()))
        z = self.new_buffer(first.shape[0], first.dtype, first.device)
        for name, x in parts.items():
            self.add(z, name, x)
        return self.finish(z)
