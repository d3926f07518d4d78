"""`lora resize`: re-factor every module of an adapter to a new rank (fixed or by a singular-value rule),
through QR of its factors and an SVD of the small core — exact singular values, no dense matrix."""

from __future__ import annotations

from typing import Optional

from loraforge.errors import FormatError
from loraforge.formats.lora import LoraState
from loraforge.ops.lora_merge import module_from_factors
from loraforge.ops.variant_lowrank import dtype_of, ordered_factors, pair_from_factors, truncation_error
from loraforge.ops.lowrank import check_rank_bound, choose_rank, refactor, refactor_flops
from loraforge.ops.threads import threads_for


def resize_state(state: LoraState, rank: Optional[int] = None, rule: str = "fixed",
                 value: Optional[float] = None, errors: dict[str, float] | None = None,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> LoraState:
    """Each module truncated to `rank` (rule fixed) or to the rank a rule picks (capped by `rank`).

    A variant module (LoHa, LoKr, Tucker LoCon, full difference) becomes a LoRA pair by the best truncation
    of its exact ΔW (`variant_lowrank.ordered_factors`), capped by its rank bound (exact there); its relative
    error goes into `errors` by name.
    `shapes` (name → base weight shape) gives conv kernels a variant stores flattened their 4-D shape."""
    out = LoraState(hints=state.hints)
    for name in state:
        module = state[name]
        if module.variant != "lora":
            if module.needs_base:
                raise FormatError(f"module {name} is a DoRA module, whose ΔW depends on the base weight; "
                                  "resize cannot turn it into a LoRA pair without the base (fuse it instead)")
            b, a, s, shape = ordered_factors(module, shape=(shapes or {}).get(name), name=name)
            cap = min(rank or module.rank_bound, s.numel())
            r = max(1, min(cap if rule == "fixed" else choose_rank(s, rule, value, cap), s.numel()))
            out[name] = pair_from_factors(b, a, r, shape, dtype_of(module))
            if errors is not None:
                errors[name] = truncation_error(s, r)
            continue
        with threads_for(refactor_flops(module.up.shape[0], module.down[0].numel(), module.rank)):
            b, a = module.factors()
            new_b, new_a, s = refactor(b, a, module.rank)
            cap = rank or module.rank
            r = cap if rule == "fixed" else choose_rank(s, rule, value, cap)
            r = min(r, s.numel())
            out[name] = module_from_factors(new_b[:, :r], new_a[:r], module, module.down.dtype)
    return out


def resize_lora(registry, ref: str, *, name: str, rank: Optional[int] = None, rule: str = "fixed",
                value: Optional[float] = None, recipe=None, input_digest: str | None = None):
    """Resize adapter `ref` and register it as `name`."""
    from loraforge.errors import ConfigError
    from loraforge.ops.lora_merge import load_inputs, variant_shapes
    from loraforge.ops.specs import AdapterInput
    from loraforge.registry.importer import adapter_info, register_adapter
    from loraforge.registry.manifest import Manifest, Parent, Provenance
    from loraforge.registry.refs import check_name

    check_name(name)
    if rule == "fixed" and not rank:
        raise ConfigError("give --rank R or an --energy / --ratio rule")
    if rank is not None and rank <= 0:
        raise ConfigError(f"rank {rank} must be a positive integer")
    loaded = load_inputs(registry, [AdapterInput(ref=ref)])
    (state, manifest, parent_ref, digest), = loaded
    check_rank_bound(rank, max(state[n].rank if state[n].variant == "lora" else state[n].rank_bound for n in state),
                     f"the largest rank of {ref}'s modules (resize only lowers ranks; a variant's rank is the "
                     "rank of its ΔW)")
    errors: dict[str, float] = {}
    out = resize_state(state, rank, rule, value, errors, shapes=variant_shapes(registry, loaded))
    worst = max(errors.values()) if errors else None
    kind = manifest.kind if manifest is not None else "lora"
    new = Manifest(
        name=name, kind=kind, digest="", files=[], adapter=adapter_info(out, "loraforge", lowrank_error=worst),
        base=manifest.base if manifest is not None else None,
        slider=manifest.slider if manifest is not None else None,
        provenance=Provenance(method="resize", params={"rank": rank, "rule": rule, "value": value},
                              parents=[Parent(ref=parent_ref, digest=digest, role="adapter", weight=1.0)],
                              recipe=recipe, source="resize"),
    )
    return register_adapter(registry, out, new, input_digest=input_digest)
