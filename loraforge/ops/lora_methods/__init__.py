"""LoRA algebra methods, one module each, registered in `loraforge.plugins.LORA_METHODS`.

A method combines, for one module, the (scaled up factor B, down factor A) pairs of the adapters that
have it with their weights, and returns new (B, A) factors as 2-D float32 matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # torch is imported where tensors are computed: listing methods needs no torch
    from torch import Tensor

from loraforge.ops.method_params import MethodParams


@dataclass(frozen=True)
class ModuleInputs:
    """What a LoRA method sees for one module."""

    name: str
    pairs: list  # [(B m×r, A r×n)], B already multiplied by alpha/rank
    weights: list[float]
    rank: Optional[int]  # the target rank (None: method default)
    params: dict[str, Any]
    indices: Optional[list[int]] = None  # each pair's adapter position among all inputs (None: 0, 1, …)

    def adapter_indices(self) -> list[int]:
        return list(self.indices) if self.indices is not None else list(range(len(self.pairs)))


class LoraMethod:
    """Base of the built-in LoRA methods."""

    Params: type[MethodParams] = MethodParams  # typed parameters (none here); `params` holds their defaults
    params: dict[str, Any] = {}
    exact: bool = False

    def combine(self, inputs: ModuleInputs) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def flops(self, m: int, n: int, ranks: list[int], rank: Optional[int]) -> float:
        """About how many operations `combine` takes on an m×n module with inputs of `ranks`, to a target
        `rank` (None: the largest input rank); it sets the thread count (`loraforge.ops.threads`). This
        default is the dense path: each ΔWᵢ = BᵢAᵢ formed, then a truncated SVD of their combination."""
        from loraforge.ops.lowrank import dense_factors_flops

        return sum(2.0 * m * n * r for r in ranks) + dense_factors_flops(m, n, rank or max(ranks))
