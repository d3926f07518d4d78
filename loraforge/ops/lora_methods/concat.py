"""concat: the exact weighted sum, rank Σrᵢ (B_cat = [w₁B₁ … w_kB_k], A_cat = [A₁; …; A_k])."""

from __future__ import annotations

from loraforge.ops.lora_methods import LoraMethod
from loraforge.plugins import LORA_METHODS


@LORA_METHODS.register("concat", reference_url="https://github.com/huggingface/peft/blob/main/src/peft/tuners/lora/model.py")
class Concat(LoraMethod):
    """Exact weighted sum by stacking factors; the rank is the sum of the input ranks."""

    exact = True

    def combine(self, inputs):
        from loraforge.ops.lowrank import stack_factors  # torch: only when combining

        return stack_factors(inputs.pairs, inputs.weights)

    def flops(self, m, n, ranks, rank):
        return float((m + n) * sum(ranks))  # a copy of the factors
