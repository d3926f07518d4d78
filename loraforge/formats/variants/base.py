"""What every adapter module variant is: named tensors exactly as a file spelled them, an optional alpha,
the shape of the weight it adapts, an exact ΔW and a bound on that ΔW's rank.

A variant keeps its tensors under the file's own suffixes (`hada_w1_a`, `lokr_w2`, ...) and never changes
their dtype, so writing it back gives the bytes it was read from. Its ΔW is computed in float32 by the
owner's code (lycoris-lora's `lycoris.functional`), imported only when a number is asked for: scanning,
checking and storing a file needs neither torch nor lycoris.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from loraforge.errors import FormatError

if TYPE_CHECKING:
    import torch
    from torch import Tensor


class VariantModule:
    """One adapted module of a non-LoRA kind. Subclasses set `variant`, `required` and `optional` (the
    suffixes they read), and implement `weight_shape`, `rank_bound` and `_delta`."""

    variant: ClassVar[str]
    description: ClassVar[str]
    reference_url: ClassVar[str] = ""
    required: ClassVar[frozenset[str]]
    optional: ClassVar[frozenset[str]] = frozenset()
    uses_alpha: ClassVar[bool] = True
    needs_base: ClassVar[bool] = False  # ΔW depends on the base weight (DoRA)
    adapts: ClassVar[str] = "weight"  # "weight" (a 2-D/4-D layer weight) or "norm" (a 1-D norm weight)

    def __init__(self, tensors: Mapping[str, Tensor], alpha: float | None = None):
        self.tensors: dict[str, Tensor] = dict(tensors)
        self.alpha = None if alpha is None else float(alpha)

    @classmethod
    def claims(cls, suffixes: frozenset[str]) -> bool:
        return cls.required <= suffixes <= cls.required | cls.optional

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(t.shape)}" for k, t in sorted(self.tensors.items()))
        return f"{type(self).__name__}({shapes}, alpha={self.alpha})"

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and other.alpha == self.alpha  # type: ignore[attr-defined]
                and other.tensors.keys() == self.tensors.keys()  # type: ignore[attr-defined]
                and all(_same(t, other.tensors[k]) for k, t in self.tensors.items()))  # type: ignore[attr-defined]

    def file_tensors(self) -> dict[str, Tensor]:
        """Every tensor of the module under its file suffix (alpha aside)."""
        return dict(self.tensors)

    # -- what the summaries and checks read -------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of ΔW as its tensors define it; a conv kernel the file stores flattened (LoHa without
        Tucker) gives (out, in·k·k), which `fits` matches against the 4-D base weight."""
        raise NotImplementedError

    @property
    def records_kernel(self) -> bool:
        """Whether the tensors say the adapted layer's kernel: False for a variant whose 2-D form may be a
        Linear layer or a conv kernel stored flattened (LoHa without Tucker, LoKr with a factored half)."""
        return True

    @property
    def rank_bound(self) -> int:
        """An upper bound on rank(ΔW.flatten(1)): the low-rank conversion at this rank is exact."""
        raise NotImplementedError

    @property
    def rank(self) -> int:
        """The rank a user would name (LyCORIS' `lora_dim`); for summaries, not for algebra."""
        return self.rank_bound

    @property
    def max_rank(self) -> int:
        shape = self.weight_shape
        return min(shape[0], math.prod(shape[1:])) if len(shape) > 1 else 1

    @property
    def is_conv(self) -> bool:
        return len(self.weight_shape) == 4

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether this module adapts a base weight of `shape`."""
        mine = tuple(self.weight_shape)
        shape = tuple(int(s) for s in shape)
        if mine == shape:
            return True
        return len(mine) == 2 and len(shape) == 4 and mine == (shape[0], math.prod(shape[1:]))

    def check_shapes(self, name: str) -> None:
        """Raise FormatError when the tensors do not make one ΔW."""
        try:
            shape = self.weight_shape
        except (IndexError, ValueError) as e:
            raise FormatError(f"{self.variant} module {name}: tensors {self._shapes()} do not fit together ({e})") from None
        if not shape or any(s <= 0 for s in shape):
            raise FormatError(f"{self.variant} module {name}: tensors {self._shapes()} give no weight")

    def _shapes(self) -> str:
        return ", ".join(f"{k} {tuple(t.shape)}" for k, t in sorted(self.tensors.items()))

    def factors(self):
        raise FormatError(f"a {self.variant} module is not a LoRA pair (B·A); convert it to low rank first "
                          "(loraforge.ops.variant_lowrank.to_lora_module)")

    # -- numbers ----------------------------------------------------------------------------
    def delta(self, dtype: torch.dtype | None = None, base_weight: Tensor | None = None) -> Tensor:
        """Dense ΔW (float32 unless `dtype`), shaped like `base_weight` when given, else `weight_shape`."""
        import torch

        if self.needs_base and base_weight is None:
            raise FormatError(f"a {self.variant} module's ΔW depends on the base weight; give the base model")
        d = self._delta(base_weight).to(torch.float32)
        if base_weight is not None:
            d = d.reshape(base_weight.shape)
        else:
            d = d.reshape(self.weight_shape)
        return d if dtype is None else d.to(dtype)

    def _delta(self, base_weight: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _f32(self, suffix: str) -> Tensor | None:
        import torch

        t = self.tensors.get(suffix)
        return None if t is None else t.to(torch.float32)

    def cast(self, dtype: torch.dtype) -> VariantModule:
        return type(self)({k: t.to(dtype) for k, t in self.tensors.items()}, self.alpha)


def _same(a, b) -> bool:
    if tuple(a.shape) != tuple(b.shape) or str(a.dtype) != str(b.dtype):
        return False
    import torch

    return bool(torch.equal(a, b))
