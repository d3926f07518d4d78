"""Add difference: θ = θ_A + α·(θ_B − θ_C)."""

from __future__ import annotations

from loraforge.ops.merge_methods import MergeMethod
from loraforge.plugins import MERGE_METHODS


@MERGE_METHODS.register("add_difference", reference_url="https://github.com/AUTOMATIC1111/stable-diffusion-webui/wiki/Features#checkpoint-merger")
class AddDifference(MergeMethod):
    """A + α·(B − C): graft what B learned on top of C onto A."""

    name = "add_difference"
    min_models = max_models = 3
    default_alpha = 1.0

    def weights(self, alpha, weights):
        return [1.0, alpha, -alpha]

    def merge(self, tensors, alpha, weights, params, ctx):
        a, b, c = tensors
        return a.add_(b.sub_(c), alpha=alpha)
