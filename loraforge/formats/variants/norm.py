"""Norm-layer differences (`w_norm`, optional `b_norm`) that LyCORIS' `train_norm` adds for GroupNorm and
LayerNorm layers: the new weight is w + w_norm, the new bias b + b_norm."""

from __future__ import annotations

from loraforge.formats.variants.base import VariantModule
from loraforge.formats.variants.registry import register_variant


@register_variant
class NormDiff(VariantModule):
    variant = "norm"
    description = "norm-layer weight/bias difference (w_norm[, b_norm])"
    reference_url = "https://github.com/KohakuBlueleaf/LyCORIS"
    required = frozenset({"w_norm"})
    optional = frozenset({"b_norm"})
    uses_alpha = False
    adapts = "norm"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.tensors["w_norm"].shape)

    @property
    def rank_bound(self) -> int:
        return 1

    @property
    def max_rank(self) -> int:
        return 1

    def check_shapes(self, name: str) -> None:
        from loraforge.errors import FormatError

        if len(self.weight_shape) != 1:
            raise FormatError(f"norm module {name}: w_norm must be 1-D, got {self.weight_shape}")
        b = self.tensors.get("b_norm")
        if b is not None and tuple(b.shape) != self.weight_shape:
            raise FormatError(f"norm module {name}: b_norm {tuple(b.shape)} does not match w_norm {self.weight_shape}")

    def factors(self):
        from loraforge.errors import FormatError

        raise FormatError("a norm module (w_norm/b_norm) adapts a norm layer, not a matrix: it has no LoRA form")

    def bias_delta(self):
        return self._f32("b_norm")

    def _delta(self, base_weight):
        return self._f32("w_norm")
