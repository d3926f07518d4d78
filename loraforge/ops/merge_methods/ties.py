"""TIES merging of checkpoints: base + α·TIES(modelᵢ − base), per whole tensor (see `loraforge.ops.sparsify`)."""

from __future__ import annotations

from loraforge.ops.merge_methods import MergeMethod, task_weights
from loraforge.ops.sparsify import TiesParams, ties_merge
from loraforge.plugins import MERGE_METHODS


@MERGE_METHODS.register("ties", reference_url="https://arxiv.org/abs/2306.01708")
class Ties(MergeMethod):
    """Base + α·TIES(modelᵢ − base): trim to density, elect sign by Σwᵢτᵢ, mean (by count) of agreeing wᵢτᵢ."""

    name = "ties"
    max_models = None
    default_alpha = 1.0
    elementwise = False  # the top-k threshold is per whole tensor

    Params = TiesParams
    params = Params().model_dump()

    def weights(self, alpha, weights):
        return [1.0] + [alpha * w for w in task_weights(weights)]

    def merge(self, tensors, alpha, weights, params, ctx):
        base = tensors[0]
        taus = [t - base for t in tensors[1:]]
        return base.add_(ties_merge(taus, task_weights(weights), float(params["density"])), alpha=alpha)
