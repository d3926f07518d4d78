"""DARE: drop each task-vector entry with probability p, rescale the rest by 1/(1 − p), then add (seeded)."""

from __future__ import annotations

import torch

from loraforge.ops.merge_methods import MergeMethod, task_weights
from loraforge.plugins import MERGE_METHODS


def dare_drop(tau: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    if drop_rate <= 0:
        return tau
    keep = torch.rand(tau.shape, generator=generator) >= drop_rate
    return tau * keep / (1.0 - drop_rate)


@MERGE_METHODS.register("dare", reference_url="https://arxiv.org/abs/2311.03099")
class Dare(MergeMethod):
    """Base + α·Σ wᵢ·DARE(modelᵢ − base); the same seed gives the same result."""

    name = "dare"
    max_models = None
    default_alpha = 1.0
    params = {"drop_rate": 0.9, "seed": 0}
    # masks are seeded per chunk (key and first row), so the chunking is part of the result: kept fixed
    chunk_elements = 8 << 20

    def weights(self, alpha, weights):
        return [1.0] + [alpha * w for w in task_weights(weights)]

    def merge(self, tensors, alpha, weights, params, ctx):
        p = float(params["drop_rate"])
        base = tensors[0]
        acc = torch.zeros_like(base)
        for i, (w, t) in enumerate(zip(task_weights(weights), tensors[1:])):
            acc.add_(dare_drop(t - base, p, ctx.generator(int(params["seed"]), i)), alpha=w)
        return base.add_(acc, alpha=alpha)
