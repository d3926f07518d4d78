"""dare on LoRAs: drop-and-rescale each module's dense weighted deltas (seeded), sum, truncated SVD."""

from __future__ import annotations

import zlib

import torch

from loraforge.ops.lora_methods import LoraMethod
from loraforge.ops.lowrank import dense_factors
from loraforge.ops.merge_methods.dare import dare_drop
from loraforge.plugins import LORA_METHODS


@LORA_METHODS.register("dare", reference_url="https://arxiv.org/abs/2311.03099")
class LoraDare(LoraMethod):
    """DARE (drop with probability p, rescale by 1/(1−p)) on dense deltas, re-factored by SVD."""

    params = {"drop_rate": 0.5, "seed": 0}

    def combine(self, inputs):
        p, seed = float(inputs.params["drop_rate"]), int(inputs.params["seed"])
        merged = None
        for i, ((b, a), w) in enumerate(zip(inputs.pairs, inputs.weights)):
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{inputs.name}:{i}".encode()))
            d = dare_drop(w * (b @ a), p, gen)
            merged = d if merged is None else merged + d
        rank = inputs.rank or max(pa[1].shape[0] for pa in inputs.pairs)
        b, a, _ = dense_factors(merged, rank, seed=seed)
        return b, a
