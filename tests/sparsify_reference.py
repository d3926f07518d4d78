"""TIES and DARE written out element by element in plain Python: the one reference both merge families
(checkpoints and LoRAs) are tested against. Slow and obvious on purpose; see `loraforge.ops.sparsify`."""

from __future__ import annotations

import torch


def trim_reference(values: list[float], density: float) -> list[float]:
    """Keep the k = ⌊density·n⌋ largest magnitudes (and every entry tied with the k-th), zero the rest."""
    n = len(values)
    k = min(int(density * n), n)
    if k <= 0:
        return [0.0] * n
    threshold = sorted((abs(v) for v in values), reverse=True)[k - 1]
    return [v if abs(v) >= threshold else 0.0 for v in values]


def ties_reference(taus: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES: t_i = w_i·trim(τ_i); sign +1 where Σ t_i ≥ 0 else −1; the mean of the t_i of that sign."""
    kept = [[w * v for v in trim_reference(t.double().flatten().tolist(), density)] for t, w in zip(taus, weights)]
    out = []
    for column in zip(*kept):
        sign = 1.0 if sum(column) >= 0 else -1.0
        agreeing = [v for v in column if v * sign > 0]
        out.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return torch.tensor(out, dtype=torch.float64).reshape(taus[0].shape)


def dare_reference(taus: list[torch.Tensor], weights: list[float], drop_rate: float,
                   keeps: list[torch.Tensor]) -> torch.Tensor:
    """DARE given each task's keep mask: Σ w_i·τ_i·keep_i / (1 − p), entry by entry."""
    flat = [t.double().flatten().tolist() for t in taus]
    masks = [m.flatten().tolist() for m in keeps]
    out = [sum(w * t[j] for t, w, m in zip(flat, weights, masks) if m[j]) / (1.0 - drop_rate)
           for j in range(len(flat[0]))]
    return torch.tensor(out, dtype=torch.float64).reshape(taus[0].shape)
