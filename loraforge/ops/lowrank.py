"""Low-rank linear algebra on LoRA factors: exact sums, QR + small-core SVD, truncated dense SVD, rank rules."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from loraforge.errors import ConfigError
from loraforge.ops.threads import threads_for

# A dense matrix gets a randomized SVD when the rank asked for is below this fraction of min(m, n).
RANDOMIZED_BELOW = 0.25


def check_rank_bound(rank: Optional[int], largest: int, what: str) -> None:
    """Refuse a rank above `largest`, the highest rank that means anything here (`what` says why), before
    any factor is allocated: a rank of 100000 on 32-wide modules is a typo, not a request for size."""
    if rank is not None and rank > largest:
        raise ConfigError(f"rank {rank} is above {largest}, {what}; use --rank {largest} or less")


def stack_factors(pairs: list[tuple[Tensor, Tensor]], weights: list[float]) -> tuple[Tensor, Tensor]:
    """(B_cat, A_cat) with B_cat = [w₁B₁ … w_kB_k] (m×R), A_cat = [A₁; …; A_k] (R×n): B_cat·A_cat = Σ wᵢBᵢAᵢ."""
    b = torch.cat([bi * w for (bi, _), w in zip(pairs, weights)], dim=1)
    a = torch.cat([ai for _, ai in pairs], dim=0)
    return b, a


def core_svd(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(Q_B, Q_A, U, S, Vh) with B·A = Q_B·U·diag(S)·Vh·Q_Aᵀ, from QR of both factors and an SVD of the
    R×R core; the m×n product is never formed."""
    # float32 Householder QR is backward stable: the result is as accurate as the float32 inputs.
    qb, rb = torch.linalg.qr(b.to(torch.float32))
    qa, ra = torch.linalg.qr(a.T.to(torch.float32))
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb, qa, u, s, vh


def refactor_flops(m: int, n: int, r: int) -> float:
    """About how many operations `refactor` of an m×r and an r×n factor takes: two thin QRs, an r×r SVD."""
    return 2.0 * (m + n) * r * r + 10.0 * r ** 3


def refactor(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The best rank-`rank` approximation (Eckart–Young) of B·A as factors (B', A'), plus all singular values."""
    with threads_for(refactor_flops(b.shape[0], a.shape[1], a.shape[0])):
        qb, qa, u, s, vh = core_svd(b, a)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        new_b = (qb @ u[:, :r]) * root
        new_a = root[:, None] * (vh[:r] @ qa.T)
        return new_b.to(torch.float32), new_a.to(torch.float32), s.to(torch.float32)


def randomized_svd(x: Tensor, k: int, oversample: int = 10, niter: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Leading k+oversample singular triplets of `x` by a randomized range finder with `niter` power
    iterations (Halko, Martinsson & Tropp 2011): 2 + 2·niter passes over x instead of a full SVD."""
    m, n = x.shape
    q = min(k + oversample, m, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=x.dtype).to(x.device)
    basis = torch.linalg.qr(x @ omega).Q
    for _ in range(niter):  # power iterations sharpen the basis when the spectrum decays slowly
        basis = torch.linalg.qr(x @ torch.linalg.qr(x.T @ basis).Q).Q
    ub, s, vh = torch.linalg.svd(basis.T @ x, full_matrices=False)
    return basis @ ub, s, vh


def dense_factors_flops(m: int, n: int, rank: int, randomized: Optional[bool] = None, niter: int = 2) -> float:
    """About how many operations `dense_factors` of an m×n matrix takes: 2 + 2·niter passes over it for the
    randomized range finder, ~10·m·n·min(m, n) for a full SVD."""
    k = min(rank, m, n)
    if _randomized(m, n, k, randomized):
        return (2 + 2 * niter) * 2.0 * m * n * min(k + 10, m, n)
    return 10.0 * m * n * min(m, n)


def _randomized(m: int, n: int, k: int, randomized: Optional[bool]) -> bool:
    return k < RANDOMIZED_BELOW * min(m, n) if randomized is None else randomized


def dense_factors(delta: Tensor, rank: int, randomized: Optional[bool] = None, niter: int = 2,
                  seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(B, A, S) with B·A the rank-`rank` truncated SVD of a dense 2-D matrix; randomized when `rank` is
    small next to min(m, n) (S then holds only the leading singular values)."""
    m, n = delta.shape
    k = min(rank, m, n)
    with threads_for(dense_factors_flops(m, n, rank, randomized, niter)):
        if _randomized(m, n, k, randomized):
            u, s, vh = randomized_svd(delta, k, niter=niter, seed=seed)
        else:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        root = s[:k].sqrt()
        return u[:, :k] * root, root[:, None] * vh[:k], s


def choose_rank(s: Tensor, rule: str, value: float, max_rank: int, total_energy: Optional[float] = None) -> int:
    """How many singular values to keep: `fixed` (value), `sv_fro` (energy fraction), `sv_ratio` (σ₀/σ ≤ value)."""
    s = s.to(torch.float64)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 1
    if rule == "fixed":
        r = int(value)
    elif rule == "sv_fro":
        if not 0 < value <= 1:
            raise ConfigError(f"energy fraction {value} must be in (0, 1], e.g. 0.95")
        total = float((s ** 2).sum()) if total_energy is None else total_energy
        cum = torch.cumsum(s ** 2, 0) / total
        r = int((cum < value - 1e-12).sum()) + 1
    elif rule == "sv_ratio":
        if value < 1:
            raise ConfigError(f"singular-value ratio {value} must be at least 1")
        r = int((s >= s[0] / value).sum())
    else:
        raise ConfigError(f"unknown rank rule {rule!r}: choose fixed, sv_fro or sv_ratio")
    return max(1, min(r, max_rank, s.numel()))
