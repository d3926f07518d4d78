"""DoRA: a low-rank module (LoRA pair, LoHa or LoKr) plus a magnitude per output (or input) channel.
W' = m · (W + ΔW₀) / ‖W + ΔW₀‖, so ΔW = W' − W needs the base weight W. Read from kohya/LyCORIS files
(`dora_scale`, norm over the output rows when shaped out×1…, over input columns when 1×in…) and from PEFT
files (`lora_magnitude_vector`, one number per output row). A weight w applied to a DoRA module scales
W' − W, as ComfyUI and A1111 apply it."""

from __future__ import annotations

from collections.abc import Mapping

from loraforge.formats.variants.base import VariantModule
from loraforge.formats.variants.registry import register_variant

MAGNITUDE_SUFFIXES = ("dora_scale", "lora_magnitude_vector")


@register_variant
class Dora(VariantModule):
    variant = "dora"
    description = "DoRA: weight-decomposed low-rank module (dora_scale / lora_magnitude_vector + a LoRA/LoHa/LoKr)"
    reference_url = "https://arxiv.org/abs/2402.09353"
    required = frozenset()
    needs_base = True

    def __init__(self, tensors: Mapping, alpha: float | None = None, inner=None):
        super().__init__(tensors, alpha)
        if inner is None:
            raise ValueError("a DoRA module is built around its low-rank module")
        self.inner = inner

    @classmethod
    def claims(cls, suffixes: frozenset[str]) -> bool:
        return False  # built by module_from_tensors, which splits off the magnitude first

    @property
    def magnitude_suffix(self) -> str:
        return next(s for s in MAGNITUDE_SUFFIXES if s in self.tensors)

    @property
    def magnitude(self):
        return self.tensors[self.magnitude_suffix]

    def file_tensors(self):
        return {**self.inner.file_tensors(), **self.tensors}

    def as_dora_scale(self) -> Dora:
        """This module with its magnitude spelled as LyCORIS' `dora_scale`, the only DoRA key lycoris, ComfyUI
        and A1111 read: PEFT's per-row `lora_magnitude_vector` ((out,), 1×out×1×1 for conv) becomes out×1…,
        the same numbers in lycoris' shape for a norm over output rows. A `dora_scale` module is itself."""
        if self.magnitude_suffix == "dora_scale":
            return self
        shape = self.weight_shape
        return Dora({"dora_scale": _reshaped(self.magnitude, (shape[0], *[1] * (len(shape) - 1)))}, self.alpha, self.inner)

    @property
    def inner_variant(self) -> str:
        return self.inner.variant

    @property
    def wd_on_out(self) -> bool:
        """Whether the norm runs over each output row (PEFT always; LyCORIS unless shaped 1×in×…)."""
        m = self.magnitude
        return self.magnitude_suffix == "lora_magnitude_vector" or m.dim() == 1 or int(m.shape[1]) == 1

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.inner.weight_shape)

    @property
    def records_kernel(self) -> bool:
        return self.inner.records_kernel

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def rank_bound(self) -> int:
        return self.max_rank

    def fits(self, shape) -> bool:
        return self.inner.fits(shape) if hasattr(self.inner, "fits") else tuple(self.inner.weight_shape) == tuple(shape)

    def check_shapes(self, name: str) -> None:
        from loraforge.errors import FormatError

        self.inner.check_shapes(name)
        m, shape = self.magnitude, self.weight_shape
        n = shape[0] if self.wd_on_out else shape[1]
        if m.numel() != n:
            raise FormatError(f"DoRA module {name}: {self.magnitude_suffix} {tuple(m.shape)} does not hold one number "
                              f"per {'output' if self.wd_on_out else 'input'} channel of its {shape} weight")

    def cast(self, dtype):
        return Dora({k: t.to(dtype) for k, t in self.tensors.items()}, self.alpha, self.inner.cast(dtype))

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other) and self.inner == other.inner  # type: ignore[attr-defined]

    def _delta(self, base_weight):
        import torch
        from lycoris.functional import weight_decompose

        w = base_weight.to(torch.float32)
        merged = w + self.inner.delta().reshape(w.shape)
        m = self._f32(self.magnitude_suffix)
        shape = [1] * w.dim()
        if self.wd_on_out:
            shape[0] = w.shape[0]
        else:
            shape[1] = w.shape[1]
        return weight_decompose(merged, m.reshape(shape), 1, self.wd_on_out, backend="torch") - w


def _reshaped(t, shape: tuple[int, ...]):
    """`t` in `shape` (same values in the same order), a torch tensor or a file's RawTensor alike."""
    if hasattr(t, "reshape"):
        return t.reshape(shape)
    from loraforge.formats.safetensors_io import RawTensor

    return RawTensor(t.st_dtype, shape, t.data)
