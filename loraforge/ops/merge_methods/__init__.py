"""Checkpoint merge methods, one module each, registered in `loraforge.plugins.MERGE_METHODS`.

A method sees one tensor at a time (all inputs in float32, the first model first) and returns the
merged tensor. `elementwise` methods may also be given row chunks of large tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # torch is imported where tensors are computed: listing methods needs no torch
    from torch import Tensor

from loraforge.errors import ConfigError
from loraforge.ops.method_params import MethodParams, method_params


@dataclass(frozen=True)
class TensorContext:
    """Where a tensor (or chunk) comes from: its key, the whole tensor's shape and the chunk's rows.

    Seeded randomness should be a function of the key and the element, never of the chunk, so that the
    result does not depend on how the engine splits a tensor: `loraforge.ops.sparsify.dare_keep(seed,
    ctx.key, index, p, ctx.shape, ctx.rows)` draws such masks.
    """

    key: str
    row_start: int = 0
    shape: Optional[tuple[int, ...]] = None  # the whole tensor's shape (None: the chunk is the whole tensor)
    row_stop: Optional[int] = None

    @property
    def rows(self) -> Optional[tuple[int, int]]:
        """(first row, row after the last) of the chunk, or None when it is the whole tensor."""
        return None if self.row_stop is None else (self.row_start, self.row_stop)


class MergeMethod:
    """Base of the built-in merge methods (a plugin may be any object with the same attributes)."""

    min_models: int = 2
    max_models: Optional[int] = 2
    default_alpha: float = 0.5
    elementwise: bool = True
    chunk_elements: Optional[int] = None  # rows per chunk for elementwise methods; None: the engine's default
    Params: type[MethodParams] = MethodParams  # typed parameters (none here); `params` holds their defaults
    params: dict[str, Any] = {}

    def check(self, num_models: int, params: dict[str, Any]) -> dict[str, Any]:
        """All parameters (defaults filled) after checking the model count and parameter names."""
        name = getattr(self, "name", type(self).__name__)
        if num_models < self.min_models or (self.max_models is not None and num_models > self.max_models):
            want = (f"{self.min_models}" if self.max_models == self.min_models
                    else f"{self.min_models} or more" if self.max_models is None
                    else f"{self.min_models} to {self.max_models}")
            raise ConfigError(f"merge method {name} takes {want} models, got {num_models}")
        return method_params("merge method", name, self, params)

    def weights(self, alpha: float, weights: list[Optional[float]]) -> list[float]:
        """The weight of each input in the result, recorded as provenance."""
        raise NotImplementedError

    def merge(self, tensors: list[Tensor], alpha: float, weights: list[Optional[float]], params: dict[str, Any],
              ctx: TensorContext) -> Tensor:
        raise NotImplementedError


def task_weights(weights: list[Optional[float]]) -> list[float]:
    """Weights of the task models (all but the base): as given, 1.0 when not."""
    return [1.0 if w is None else float(w) for w in weights[1:]]
