"""dare on LoRAs: DARE (see `loraforge.ops.sparsify`) on each module's dense deltas, then a truncated SVD.
Module `unet.<path>` draws the masks of checkpoint tensor `unet/<path>.weight`, so the ΔW (before the
truncation) is the one `merge checkpoints --method dare` gives on a diffusers base + ΔWᵢ with the same seed."""

from __future__ import annotations

from pydantic import Field

from loraforge.ops.lora_methods import LoraMethod
from loraforge.ops.sparsify import DareParams, dare_keep, dare_merge, lora_key
from loraforge.plugins import LORA_METHODS


@LORA_METHODS.register("dare", reference_url="https://arxiv.org/abs/2311.03099")
class LoraDare(LoraMethod):
    """The checkpoint DARE, same masks, on each module's dense ΔWᵢ (keep w.p. 1−p, ×1/(1−p)), then SVD to the rank."""


    class Params(DareParams):
        seed: int = Field(0, description="seed of the drop masks and the randomized SVD, an integer")

    params = Params().model_dump()

    def combine(self, inputs):
        from loraforge.ops.lowrank import dense_factors  # torch: only when combining

        p, seed = float(inputs.params["drop_rate"]), int(inputs.params["seed"])
        deltas = [b @ a for b, a in inputs.pairs]
        key = lora_key(inputs.name)
        keeps = [dare_keep(seed, key, i, p, tuple(d.shape)) for i, d in zip(inputs.adapter_indices(), deltas)]
        merged = dare_merge(deltas, inputs.weights, p, keeps)
        rank = inputs.rank or max(pa[1].shape[0] for pa in inputs.pairs)
        b, a, _ = dense_factors(merged, rank, seed=seed)
        return b, a
