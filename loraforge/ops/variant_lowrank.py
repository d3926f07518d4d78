"""Variant modules (LoHa, LoKr, Tucker LoCon, DoRA, full differences) as LoRA pairs, for the LoRA algebra,
resizing and diffusers' loader: an SVD of the module's exact ΔW, exact when the rank asked for reaches the
variant's rank bound (LoHa r₁·r₂, LoKr rank(W₁)·rank(W₂)), otherwise the truncated SVD, whose relative
error ‖ΔW − B·A‖_F / ‖ΔW‖_F is returned so callers can report it and record it in the manifest."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch

from loraforge.errors import ConfigError, FormatError
from loraforge.formats.lora import LoraModule, LoraState
from loraforge.ops.threads import threads_for


def to_lora_module(module, rank: Optional[int] = None, base_weight: torch.Tensor | None = None,
                   shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None,
                   name: str = "") -> tuple[LoraModule, float]:
    """(LoRA pair, relative Frobenius error) for `module` at `rank` (its rank bound when None), shaped for a
    base weight of `shape` (a conv kernel a LoHa stores flattened needs it). A LoraModule at or under `rank`
    comes back unchanged."""
    if module.variant == "lora" and (rank is None or rank >= module.rank):
        return module, 0.0
    if module.adapts != "weight":
        raise FormatError(f"module {name} is a {module.variant} module (a norm layer's weight and bias), "
                          "which has no LoRA form; fuse the adapter into a checkpoint instead")
    if base_weight is not None:
        shape = tuple(base_weight.shape)
    shape = tuple(int(s) for s in (shape or module.weight_shape))
    if len(shape) == 2 and len(module.weight_shape) == 2 and len(shape) != len(module.weight_shape):
        shape = tuple(module.weight_shape)
    delta = module.delta(base_weight=base_weight).reshape(shape[0], -1)
    m, n = delta.shape
    r = min(rank if rank is not None else module.rank_bound, m, n)
    if r <= 0:
        raise ConfigError(f"rank {rank} must be a positive integer")
    with threads_for(10.0 * m * n * min(m, n)):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    total = float(s.square().sum())
    error = math.sqrt(float(s[r:].square().sum()) / total) if total > 0 else 0.0
    root = s[:r].sqrt()
    b = u[:, :r] * root
    a = root[:, None] * vh[:r]
    out_dtype = dtype or _dtype_of(module)
    if len(shape) == 4:
        down, up = a.reshape(r, *shape[1:]), b.reshape(m, r, 1, 1)
    else:
        down, up = a, b
    return LoraModule(down=down.contiguous().to(out_dtype), up=up.contiguous().to(out_dtype), alpha=float(r)), error


def _dtype_of(module) -> torch.dtype:
    dtypes = [t.dtype for t in module.file_tensors().values() if t.is_floating_point()]
    return max(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32


def lowrank_state(state: LoraState, rank: Optional[int] = None,
                  shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[LoraState, dict[str, float]]:
    """`state` with every variant module as a LoRA pair (plain LoRA modules kept as they are unless above
    `rank`), and the relative error of each converted module by name. DoRA needs the base weight: refused."""
    out = LoraState(hints=state.hints)
    errors: dict[str, float] = {}
    for name in state:
        module = state[name]
        if module.variant == "lora":
            out[name] = module
            continue
        if module.needs_base:
            raise FormatError(f"module {name} is a DoRA module, whose ΔW depends on the base weight; fuse it into "
                              "its base (lora fuse) or render with it instead of combining it as a LoRA")
        out[name], errors[name] = to_lora_module(module, rank, shape=(shapes or {}).get(name), name=name)
    return out, errors


def worst_error(errors: Mapping[str, float]) -> dict[str, float | str] | None:
    """What a manifest records of a conversion: the largest relative error and where it is."""
    if not errors:
        return None
    name = max(errors, key=lambda k: errors[k])
    return {"max_relative_error": errors[name], "module": name, "modules_converted": len(errors)}
