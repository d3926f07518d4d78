"""Task arithmetic: θ = θ_A + α·Σ wᵢ·(θᵢ − θ_A), with A the base model."""

from __future__ import annotations

from loraforge.ops.merge_methods import MergeMethod, task_weights
from loraforge.plugins import MERGE_METHODS


@MERGE_METHODS.register("task_arithmetic", reference_url="https://arxiv.org/abs/2212.04089")
class TaskArithmetic(MergeMethod):
    """Base + α·Σ wᵢ·(modelᵢ − base); weights default to 1."""

    name = "task_arithmetic"
    max_models = None
    default_alpha = 1.0

    def weights(self, alpha, weights):
        return [1.0] + [alpha * w for w in task_weights(weights)]

    def merge(self, tensors, alpha, weights, params, ctx):
        base = tensors[0]
        acc = None
        for w, t in zip(task_weights(weights), tensors[1:]):
            tau = t.sub_(base).mul_(w)
            acc = tau if acc is None else acc.add_(tau)
        return base.add_(acc, alpha=alpha)
