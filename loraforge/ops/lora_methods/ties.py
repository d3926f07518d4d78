"""ties on LoRAs: TIES (see `loraforge.ops.sparsify`) on each module's dense deltas, then a truncated SVD
back to rank r — the same ΔW as `merge checkpoints --method ties` on base + ΔWᵢ, before the truncation."""

from __future__ import annotations

from pydantic import Field

from loraforge.ops.lora_methods import LoraMethod
from loraforge.ops.sparsify import TiesParams, ties_merge
from loraforge.plugins import LORA_METHODS


@LORA_METHODS.register("ties", reference_url="https://arxiv.org/abs/2306.01708")
class LoraTies(LoraMethod):
    """The checkpoint TIES on each module's dense ΔWᵢ (mean by count of agreeing wᵢΔWᵢ), then SVD to the rank."""


    class Params(TiesParams):
        seed: int = Field(0, description="seed of the randomized SVD, an integer")

    params = Params().model_dump()

    def combine(self, inputs):
        from loraforge.ops.lowrank import dense_factors  # torch: only when combining

        deltas = [b @ a for b, a in inputs.pairs]
        merged = ties_merge(deltas, inputs.weights, float(inputs.params["density"]))
        rank = inputs.rank or max(p[1].shape[0] for p in inputs.pairs)
        b, a, _ = dense_factors(merged, rank, seed=int(inputs.params["seed"]))
        return b, a
