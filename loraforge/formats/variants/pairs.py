"""LoHa, LoKr and Tucker LoCon modules written as the LoRA pair of the same ΔW, for formats that spell only
LoRA pairs (diffusers, PEFT): their structured factors (`lora_factors`: Khatri–Rao, Kronecker, core
contraction) are already a pair B·A = ΔW, so the pair is exact at the variant's rank bound and needs no SVD.

A conv kernel that LoHa and factored LoKr store flattened makes a 4-D pair only with the base layer's
shape; without it the module is refused unless its name is a Linear layer in every SD1/SDXL base.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from loraforge.errors import FormatError

if TYPE_CHECKING:
    import torch

    from loraforge.formats.lora import LoraModule, LoraState

# The variants whose ΔW is a product of small factors (no base weight, no dense difference).
STRUCTURED = frozenset({"loha", "lokr", "locon_tucker"})

# Module names (the last path segment, two for an index) that are nn.Linear wherever diffusers'
# UNet2DConditionModel has them: attention projections, feed-forward layers, time and added embeddings.
# CLIP text encoders hold only Linear layers. Any other 2-D variant may be a conv kernel stored flattened.
LINEAR_LEAVES = frozenset({"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "proj", "net.2", "time_emb_proj", "linear_1", "linear_2"})


def always_linear(name: str) -> bool:
    """Whether canonical module `name` adapts a Linear layer in every SD1/SDXL base (LINEAR_LEAVES)."""
    component, _, path = name.partition(".")
    if component.startswith("text_encoder"):
        return True
    parts = path.split(".")
    return (".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]) in LINEAR_LEAVES


def pair_shape(module, shape: tuple[int, ...] | None, name: str) -> tuple[int, ...]:
    """The shape of the weight `module` adapts: `shape` (the base layer's) when known, else the module's own,
    refused in one line when the module stores a kernel flattened and its name may be a conv layer."""
    if shape is None and not module.records_kernel and not always_linear(name):
        raise FormatError(f"module {name} is a {module.variant} module whose file does not say whether it adapts a "
                          "Linear layer or a conv layer (whose kernel it stores flattened), so its LoRA pair needs the "
                          "base layer's shape and the adapter records no base: import it again with --base")
    return tuple(int(s) for s in (shape or module.weight_shape))


def pair_from_factors(b: torch.Tensor, a: torch.Tensor, r: int, shape: tuple[int, ...],
                      dtype: torch.dtype) -> LoraModule:
    """The LoRA pair (alpha = r, so scale 1) of B[:, :r]·A[:r], linear or conv as `shape` says."""
    from loraforge.formats.lora import LoraModule

    b, a = b[:, :r], a[:r]
    if len(shape) == 4:
        down, up = a.reshape(r, *shape[1:]), b.reshape(b.shape[0], r, 1, 1)
    else:
        down, up = a, b
    return LoraModule(down=down.contiguous().to(dtype), up=up.contiguous().to(dtype), alpha=float(r))


def dtype_of(module) -> torch.dtype:
    """The widest floating dtype among the module's tensors (float32 when it has none)."""
    import torch

    dtypes = [t.dtype for t in module.file_tensors().values() if t.is_floating_point()]
    return max(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32


def exact_pair(module, shape: tuple[int, ...] | None = None, name: str = "") -> LoraModule:
    """The LoRA pair with ΔW = B·A exactly, of rank `module.rank_bound`, shaped for a base weight of `shape`.

    The structured factors have r₁·r₂ columns (LoHa, LoKr) or r (Tucker LoCon); when that is more than the
    weight's smaller side, the pair is that side's identity against the product, which is the same ΔW."""
    import torch

    if module.variant not in STRUCTURED:
        raise FormatError(f"module {name} is a {module.variant} module, which has no exact LoRA factors")
    shape = pair_shape(module, shape, name)
    b, a = module.lora_factors()
    m, n = b.shape[0], a.shape[1]
    if a.shape[0] > min(m, n):
        b, a = (torch.eye(m), b @ a) if m <= n else (b @ a, torch.eye(n))
    return pair_from_factors(b, a, a.shape[0], shape, dtype_of(module))


def exact_pairs(state: LoraState, spelled, shapes: Mapping[str, tuple[int, ...]] | None = None
                ) -> tuple[LoraState, dict[str, int], list[int]]:
    """(`state` with every structured module whose variant is not in `spelled` as its exact LoRA pair, how many
    modules of each variant were converted, the ranks of the pairs written). `shapes` maps a module name to
    its base weight shape."""
    from loraforge.formats.lora import LoraState

    out = LoraState(hints=state.hints)
    converted: dict[str, int] = {}
    ranks: list[int] = []
    for name in state:
        module = state[name]
        if module.variant in STRUCTURED and module.variant not in spelled:
            out[name] = exact_pair(module, (shapes or {}).get(name), name)
            converted[module.variant] = converted.get(module.variant, 0) + 1
            ranks.append(out[name].rank)
        else:
            out[name] = module
    return out, converted, ranks
