"""ties on LoRAs: TIES on each module's dense weighted deltas, then a truncated SVD back to rank r."""

from __future__ import annotations

from loraforge.ops.lora_methods import LoraMethod
from loraforge.ops.lowrank import dense_factors
from loraforge.ops.merge_methods.ties import trim_top
from loraforge.plugins import LORA_METHODS

import torch


def ties_sum(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """Trim each weighted delta, elect the sign by total mass, average the agreeing entries (PEFT's rule)."""
    trimmed = torch.stack([trim_top(d, density) for d in deltas])
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


@LORA_METHODS.register("ties", reference_url="https://arxiv.org/abs/2306.01708")
class LoraTies(LoraMethod):
    """TIES (trim, elect sign, disjoint mean) on dense per-module deltas, re-factored by SVD."""

    params = {"density": 0.5, "seed": 0}

    def combine(self, inputs):
        deltas = [w * (b @ a) for (b, a), w in zip(inputs.pairs, inputs.weights)]
        merged = ties_sum(deltas, float(inputs.params["density"]))
        rank = inputs.rank or max(p[1].shape[0] for p in inputs.pairs)
        b, a, _ = dense_factors(merged, rank, seed=int(inputs.params["seed"]))
        return b, a
