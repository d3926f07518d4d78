"""DARE merging of checkpoints: base + α·Σ wᵢ·DARE(modelᵢ − base), seeded per tensor, task and row block
(see `loraforge.ops.sparsify`: the result does not depend on how the tensor is chunked)."""

from __future__ import annotations

from loraforge.ops.merge_methods import MergeMethod, task_weights
from loraforge.ops.sparsify import DARE_BLOCK_ELEMENTS, DareParams, dare_keep, dare_merge
from loraforge.plugins import MERGE_METHODS


@MERGE_METHODS.register("dare", reference_url="https://arxiv.org/abs/2311.03099")
class Dare(MergeMethod):
    """Base + α·Σ wᵢ·DARE(modelᵢ − base): drop with probability p, rescale by 1/(1−p); seeded, chunk-independent."""

    name = "dare"
    max_models = None
    default_alpha = 1.0

    Params = DareParams
    params = Params().model_dump()
    # chunks of whole mask blocks draw each block once (any chunking gives the same result)
    chunk_elements = DARE_BLOCK_ELEMENTS

    def weights(self, alpha, weights):
        return [1.0] + [alpha * w for w in task_weights(weights)]

    def merge(self, tensors, alpha, weights, params, ctx):
        p, seed = float(params["drop_rate"]), int(params["seed"])
        base = tensors[0]
        shape = ctx.shape if ctx.shape is not None else tuple(base.shape)
        taus = [t.sub_(base) for t in tensors[1:]]
        keeps = [dare_keep(seed, ctx.key, i, p, shape, ctx.rows) for i in range(len(taus))]
        return base.add_(dare_merge(taus, task_weights(weights), p, keeps), alpha=alpha)
