"""LoCon with a Tucker core (`lora_mid.weight`): a conv ΔW = (alpha/r) · mid ×₁ up ×₂ down, as LyCORIS
writes it for `use_tucker` conv layers (down and up are 1×1, the mid core carries the kernel)."""

from __future__ import annotations

from loraforge.formats.variants.base import VariantModule
from loraforge.formats.variants.registry import register_variant


@register_variant
class LoConTucker(VariantModule):
    variant = "locon_tucker"
    description = "LoCon with a Tucker mid weight (lora_down / lora_mid / lora_up)"
    reference_url = "https://github.com/KohakuBlueleaf/LyCORIS"
    required = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight"})

    @property
    def rank(self) -> int:
        return int(self.tensors["lora_down.weight"].shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        down, up, mid = (self.tensors[k] for k in ("lora_down.weight", "lora_up.weight", "lora_mid.weight"))
        if down.shape[0] != mid.shape[1] or up.shape[1] != mid.shape[0]:
            raise ValueError("lora_mid's two first dimensions must be up's and down's ranks")
        return (int(up.shape[0]), int(down.shape[1]), *(int(s) for s in mid.shape[2:]))

    @property
    def rank_bound(self) -> int:
        return min(self.rank, int(self.tensors["lora_up.weight"].shape[1]))

    def _delta(self, base_weight):
        from lycoris.functional import locon

        return locon.diff_weight(self._f32("lora_down.weight"), self._f32("lora_up.weight"),
                                 self._f32("lora_mid.weight"), gamma=self.scale, backend="torch")

    def lora_factors(self):
        """(B, A) in float32 with B·A = ΔW.flatten(1): B = scale·up, A = the mid core contracted with down."""
        import torch

        down, up, mid = (self._f32(k) for k in ("lora_down.weight", "lora_up.weight", "lora_mid.weight"))
        a = torch.einsum("pq...,qi->pi...", mid, down.reshape(down.shape[0], -1)).reshape(mid.shape[0], -1)
        return up.reshape(up.shape[0], -1) * self.scale, a
