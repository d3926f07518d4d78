"""Weighted sum: θ = (1 − α)·θ_A + α·θ_B."""

from __future__ import annotations

from loraforge.ops.merge_methods import MergeMethod
from loraforge.plugins import MERGE_METHODS


@MERGE_METHODS.register("weighted_sum", reference_url="https://github.com/AUTOMATIC1111/stable-diffusion-webui/wiki/Features#checkpoint-merger")
class WeightedSum(MergeMethod):
    """(1 − α)·A + α·B, the classic checkpoint interpolation."""

    name = "weighted_sum"
    default_alpha = 0.5

    def weights(self, alpha, weights):
        return [1.0 - alpha, alpha]

    def merge(self, tensors, alpha, weights, params, ctx):
        a, b = tensors
        return a.mul_(1.0 - alpha).add_(b, alpha=alpha)
