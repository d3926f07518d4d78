"""Variant modules (LoHa, LoKr, Tucker LoCon, DoRA, full differences) as LoRA pairs, for the LoRA algebra,
resizing and diffusers' loader: the best truncation of the module's exact ΔW, exact when the rank asked for
reaches the variant's rank bound (LoHa r₁·r₂, LoKr rank(W₁)·rank(W₂)), otherwise the truncated SVD, whose
relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F is returned so callers can report it and record it in the manifest.
The pair shapes and the exact pairs exports write come from `formats.variants.pairs`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch

from loraforge.errors import ConfigError, FormatError
from loraforge.formats.lora import LoraModule, LoraState
from loraforge.formats.variants.pairs import (  # noqa: F401 (LINEAR_LEAVES, always_linear: re-exported)
    LINEAR_LEAVES, always_linear, dtype_of, pair_from_factors, pair_shape,
)
from loraforge.ops.lowrank import refactor
from loraforge.ops.threads import threads_for


def ordered_factors(module, base_weight: torch.Tensor | None = None, shape: tuple[int, ...] | None = None,
                    name: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(B, A, S, weight shape): B·A = ΔW.flatten(1) with columns in decreasing singular value S, so
    B[:, :r]·A[:r] is the best rank-r approximation (Eckart–Young). `shape` is the base weight's (a conv
    kernel LoHa and LoKr store flattened needs it).

    Variants with exact low-rank factors (LoHa's Khatri–Rao, LoKr's Kronecker, Tucker LoCon's core) go
    through QR of those factors and an SVD of the small core, never forming ΔW; the others (full
    differences, DoRA) take a dense SVD."""
    if module.adapts != "weight":
        raise FormatError(f"module {name} is a {module.variant} module (a norm layer's weight and bias), "
                          "which has no LoRA form; fuse the adapter into a checkpoint instead")
    if base_weight is not None:
        shape = tuple(base_weight.shape)
    shape = pair_shape(module, shape, name)
    if hasattr(module, "lora_factors") and not module.needs_base:
        b, a = module.lora_factors()
        new_b, new_a, s = refactor(b, a, a.shape[0])
        return new_b, new_a, s, shape
    delta = module.delta(base_weight=base_weight).reshape(shape[0], -1)
    m, n = delta.shape
    with threads_for(10.0 * m * n * min(m, n)):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s.sqrt()
    return u * root, root[:, None] * vh, s, shape


def truncation_error(s: torch.Tensor, r: int) -> float:
    """‖ΔW − ΔW_r‖_F / ‖ΔW‖_F of the best rank-r approximation, from the singular values."""
    total = float(s.double().square().sum())
    return math.sqrt(float(s[r:].double().square().sum()) / total) if total > 0 else 0.0


def to_lora_module(module, rank: Optional[int] = None, base_weight: torch.Tensor | None = None,
                   shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None,
                   name: str = "") -> tuple[LoraModule, float]:
    """(LoRA pair, relative Frobenius error) for `module` at `rank` (its rank bound when None, exact), shaped
    for a base weight of `shape`. A LoraModule at or under `rank` comes back unchanged."""
    if module.variant == "lora" and (rank is None or rank >= module.rank):
        return module, 0.0
    if rank is not None and rank <= 0:
        raise ConfigError(f"rank {rank} must be a positive integer")
    b, a, s, shape = ordered_factors(module, base_weight, shape, name)
    r = max(1, min(rank if rank is not None else module.rank_bound, s.numel()))
    return pair_from_factors(b, a, r, shape, dtype or dtype_of(module)), truncation_error(s, r)


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


def worst_error(errors: Mapping[str, float]) -> tuple[str, float] | None:
    """(module, relative error) of the worst converted module, None when nothing was converted."""
    if not errors:
        return None
    name = max(errors, key=lambda k: errors[k])
    return name, errors[name]
