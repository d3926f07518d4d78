"""TIES merging: trim task vectors to their top-k% magnitudes, elect a sign, take the disjoint mean."""

from __future__ import annotations

import torch

from loraforge.ops.merge_methods import MergeMethod, task_weights
from loraforge.plugins import MERGE_METHODS


def trim_top(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the `density` fraction of largest-magnitude entries (ties broken by keeping them)."""
    k = int(round(density * tau.numel()))
    if k >= tau.numel():
        return tau
    if k <= 0:
        return torch.zeros_like(tau)
    flat = tau.abs().flatten()
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    return tau * (tau.abs() >= threshold)


def ties_combine(taus: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """Σ wᵢτᵢ over entries agreeing with the elected sign, divided by the weight of those entries."""
    trimmed = torch.stack([trim_top(t, density) * w for t, w in zip(taus, weights)])
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    w = torch.tensor(weights, dtype=trimmed.dtype).reshape(-1, *([1] * (trimmed.dim() - 1)))
    total = (trimmed * agree).sum(0)
    norm = (w.abs() * agree).sum(0)
    return torch.where(norm > 0, total / norm.clamp(min=1e-12), torch.zeros_like(total))


@MERGE_METHODS.register("ties", reference_url="https://arxiv.org/abs/2306.01708")
class Ties(MergeMethod):
    """Base + α·TIES(τᵢ = modelᵢ − base): trim (density), elect sign, disjoint weighted mean."""

    name = "ties"
    max_models = None
    default_alpha = 1.0
    elementwise = False  # the top-k threshold is per whole tensor
    params = {"density": 0.2}

    def weights(self, alpha, weights):
        return [1.0] + [alpha * w for w in task_weights(weights)]

    def merge(self, tensors, alpha, weights, params, ctx):
        base = tensors[0]
        taus = [t - base for t in tensors[1:]]
        return base.add_(ties_combine(taus, task_weights(weights), float(params["density"])), alpha=alpha)
