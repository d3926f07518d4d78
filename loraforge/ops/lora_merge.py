"""LoRA algebra: combine weighted adapters module by module with a registered LoRA method."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from loraforge.errors import ConfigError, FormatError, IncompatibleBaseError
from loraforge.families import describe
from loraforge.formats.lora import LoraModule, LoraState
from loraforge.ops.lora_methods import ModuleInputs
from loraforge.ops.lowrank import check_rank_bound
from loraforge.ops.method_params import method_params
from loraforge.ops.threads import threads_for
from loraforge.ops.specs import AdapterInput, LoraMergeSpec


def get_lora_method(name: str):
    from loraforge.plugins import LORA_METHODS

    method = LORA_METHODS.get(name)
    return method() if isinstance(method, type) else method


def module_from_factors(b: torch.Tensor, a: torch.Tensor, like: LoraModule, dtype: torch.dtype) -> LoraModule:
    """A LoraModule (alpha = rank, so scale 1) with B·A, shaped like `like` (linear or conv)."""
    r = a.shape[0]
    if like.is_conv:
        down = a.reshape(r, *like.down.shape[1:])
        up = b.reshape(b.shape[0], r, 1, 1)
    else:
        down, up = a, b
    return LoraModule(down=down.contiguous().to(dtype), up=up.contiguous().to(dtype), alpha=float(r))


def combine_states(states: list[LoraState], weights: list[float], method: str, rank: Optional[int] = None,
                   params: dict[str, Any] | None = None, labels: list[str] | None = None,
                   progress: Callable[..., None] | None = None, errors: dict[str, float] | None = None,
                   shapes: dict[str, tuple[int, ...]] | None = None) -> LoraState:
    """The merged LoraState. Adapters may have different ranks and module sets; weights may be negative.

    Variant modules (LoHa, LoKr, Tucker LoCon, full differences) enter as LoRA pairs at their exact rank
    bound; the relative error of each conversion (float32 rounding only) goes into `errors`. `shapes`
    (module name → base weight shape) gives conv kernels that a variant stores flattened their shape."""
    from loraforge.ops.variant_lowrank import lowrank_state

    # A conv kernel a LoHa stores flattened takes its 4-D shape from the base, or from another adapter.
    shapes = dict(shapes or {})
    for state in states:
        shapes.update({n: state[n].weight_shape for n in state if len(state[n].weight_shape) == 4 and n not in shapes})
    converted = []
    for state, label in zip(states, labels or [f"adapter {i + 1}" for i in range(len(states))]):
        if state.is_plain_lora:
            converted.append(state)
            continue
        try:
            pairs, errs = lowrank_state(state, shapes=shapes)
        except FormatError as e:
            raise FormatError(f"{label}: {e}") from None
        converted.append(pairs)
        if errors is not None:
            errors.update({f"{label}:{k}": v for k, v in errs.items()})
    states = converted
    impl = get_lora_method(method)
    full = method_params("LoRA merge method", method, impl, params or {})
    labels = labels or [f"adapter {i + 1}" for i in range(len(states))]
    names = sorted(set().union(*[set(s) for s in states]))
    if rank is not None and impl.exact:
        raise ConfigError(f"--rank does not apply to {method}: it keeps the exact sum (rank Σrᵢ); "
                          f"use --method svd to choose a rank")
    check_rank_bound(rank, max((s[n].max_rank for s in states for n in s), default=0),
                     "the largest min(out, in) of the adapters' modules")
    out = LoraState()
    dtype = max((s.dtype for s in states if s.dtype is not None), key=lambda d: torch.finfo(d).bits,
                default=torch.float32)
    for name in names:
        present = [(s[name], w, label) for s, w, label in zip(states, weights, labels) if name in s]
        indices = [i for i, s in enumerate(states) if name in s]
        shape = present[0][0].weight_shape
        for m, _, label in present[1:]:
            if m.weight_shape != shape:
                raise IncompatibleBaseError(f"module {name} has shape {m.weight_shape} in {label} but {shape} in "
                                            f"{present[0][2]}: the adapters are for different base models")
        m, n = shape[0], math.prod(shape[1:])
        with threads_for(impl.flops(m, n, [mod.rank for mod, _, _ in present], rank)):
            inputs = ModuleInputs(name, [mod.factors() for mod, _, _ in present], [w for _, w, _ in present], rank,
                                  full, indices)
            b, a = impl.combine(inputs)
            out[name] = module_from_factors(b, a, present[0][0], dtype)
        if progress:
            progress()
    return out


def _input_digest_of(path: Path) -> str:
    from loraforge.hashing import sha256_file, sha256_folder

    return sha256_folder(path) if path.is_dir() else sha256_file(path)


def load_inputs(registry, adapters: list[AdapterInput], base=None):
    """[(state, manifest or None, parent ref, digest)] for each adapter input."""
    from loraforge.registry.resolve import load_adapter

    from loraforge.formats.embeddings import Embedding

    loaded = []
    for item in adapters:
        state, manifest = load_adapter(registry, item.ref, base=base)
        if isinstance(state, Embedding):
            raise ConfigError(f"{item.ref} is an embedding (token {state.token}): LoRA algebra cannot fold a token "
                              "embedding into a LoRA or a checkpoint; stack the LoRAs and give the embedding to the "
                              "render or generate step beside them")
        if manifest is not None:
            loaded.append((state, manifest, manifest.ref, manifest.digest))
        else:
            path = Path(item.ref).expanduser()
            loaded.append((state, None, item.ref, _input_digest_of(path)))
    return loaded


def variant_shapes(registry, loaded) -> dict[str, tuple[int, ...]]:
    """Module name → base weight shape from the base recorded with any input holding variant modules (a LoHa
    stores a conv kernel flattened; its LoRA pair needs the 4-D shape); empty when no input records a base."""
    from loraforge.registry.resolve import base_targets, resolve_base

    for state, manifest, _, _ in loaded:
        if state.is_plain_lora or manifest is None or manifest.base is None:
            continue
        targets = base_targets(resolve_base(registry, manifest.base.ref)) or {}
        return {f"{c}.{p}": tuple(shape) for c, paths in targets.items() for p, shape in paths.items()}
    return {}


def check_same_family(loaded) -> Optional[Any]:
    """The BaseInfo the inputs agree on (or None); IncompatibleBaseError when two differ in family."""
    base_info = None
    for _, manifest, ref, _ in loaded:
        info = manifest.base if manifest is not None else None
        if info is None or info.family is None:
            continue
        if base_info is not None and base_info.family != info.family:
            raise IncompatibleBaseError(f"{ref} is an adapter for a {describe(info.family)} base but another input is "
                                        f"for {describe(base_info.family)}: they cannot be merged")
        base_info = base_info or info
    return base_info


def merge_loras(registry, spec: LoraMergeSpec, *, name: str, recipe=None, input_digest: str | None = None,
                base: str | None = None, progress: Callable[..., None] | None = None):
    """Merge the adapters of `spec` and register the result as LoRA `name` with full provenance.

    `base` (a reference) is the base the result sits on (a stack's declared base); it must be of the
    family the inputs were made for.
    """
    from loraforge.registry.importer import register_adapter
    from loraforge.registry.manifest import Manifest, Parent, Provenance
    from loraforge.registry.refs import check_name

    check_name(name)
    get_lora_method(spec.method)  # an unknown method fails before any adapter is read
    loaded = load_inputs(registry, spec.adapters)
    base_info = check_same_family(loaded)
    if base is not None and (base_info is None or base_info.ref != base):
        from loraforge.registry.manifest import BaseInfo
        from loraforge.registry.resolve import resolve_base

        declared = resolve_base(registry, base)
        if base_info is not None and base_info.family and declared.family and base_info.family != declared.family:
            raise IncompatibleBaseError(f"the adapters are for a {describe(base_info.family)} base but {base} is "
                                        f"{describe(declared.family)}: stack them on a {describe(base_info.family)} base")
        base_info = BaseInfo(ref=declared.ref, digest=declared.digest, family=declared.family)
    errors: dict[str, float] = {}
    state = combine_states([s for s, *_ in loaded], [a.weight for a in spec.adapters], spec.method, spec.rank,
                           dict(spec.params), labels=[ref for _, _, ref, _ in loaded], progress=progress,
                           errors=errors, shapes=variant_shapes(registry, loaded))
    parents = [Parent(ref=ref, digest=digest, role="adapter", weight=a.weight)
               for (_, _, ref, digest), a in zip(loaded, spec.adapters)]
    params = {"rank": spec.rank, **{**get_lora_method(spec.method).params, **spec.params}}
    from loraforge.registry.importer import adapter_info

    manifest = Manifest(name=name, kind="lora", digest="", files=[], base=base_info,
                        adapter=adapter_info(state, "loraforge", lowrank_error=max(errors.values()) if errors else None),
                        provenance=Provenance(method=f"lora_merge:{spec.method}", params=params, parents=parents,
                                              recipe=recipe, source=f"lora_merge:{spec.method}"))
    return register_adapter(registry, state, manifest, input_digest=input_digest)
