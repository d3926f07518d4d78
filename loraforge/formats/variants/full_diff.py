"""Full weight differences (`diff`, optional `diff_b` for the bias), as LyCORIS' `full` algorithm and
kohya's fine-tune extraction write them: ΔW is the tensor itself, of full rank."""

from __future__ import annotations

import math

from loraforge.formats.variants.base import VariantModule
from loraforge.formats.variants.registry import register_variant


@register_variant
class FullDiff(VariantModule):
    variant = "full"
    description = "full weight difference (diff[, diff_b])"
    reference_url = "https://github.com/KohakuBlueleaf/LyCORIS"
    required = frozenset({"diff"})
    optional = frozenset({"diff_b"})
    uses_alpha = False

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.tensors["diff"].shape)

    @property
    def rank_bound(self) -> int:
        shape = self.weight_shape
        return min(shape[0], math.prod(shape[1:])) if len(shape) > 1 else 1

    def check_shapes(self, name: str) -> None:
        super().check_shapes(name)
        diff_b = self.tensors.get("diff_b")
        if diff_b is not None and tuple(diff_b.shape) != (self.weight_shape[0],):
            from loraforge.errors import FormatError

            raise FormatError(f"full module {name}: diff_b {tuple(diff_b.shape)} is not one number per output "
                              f"of diff {self.weight_shape}")

    def bias_delta(self):
        return self._f32("diff_b")

    def _delta(self, base_weight):
        return self._f32("diff")
