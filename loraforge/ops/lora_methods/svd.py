"""svd: the exact weighted sum re-factored to a target rank via QR of the stacked factors and an SVD
of the small R×R core — the Eckart–Young optimum, without ever forming the m×n delta."""

from __future__ import annotations

from loraforge.ops.lora_methods import LoraMethod
from loraforge.plugins import LORA_METHODS


@LORA_METHODS.register("svd", reference_url="https://en.wikipedia.org/wiki/Low-rank_approximation")
class Svd(LoraMethod):
    """Best rank-r approximation of the exact weighted sum (exact when r ≥ Σrᵢ)."""

    def combine(self, inputs):
        from loraforge.ops.lowrank import refactor, stack_factors  # torch: only when combining

        b, a = stack_factors(inputs.pairs, inputs.weights)
        rank = inputs.rank or max(p[1].shape[0] for p in inputs.pairs)
        new_b, new_a, _ = refactor(b, a, rank)
        return new_b, new_a

    def flops(self, m, n, ranks, rank):
        from loraforge.ops.lowrank import refactor_flops

        return refactor_flops(m, n, sum(ranks))
