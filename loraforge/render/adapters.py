"""Loading a base pipeline and attaching weighted adapters through diffusers' LoRA loader."""

from __future__ import annotations

import warnings
from typing import Sequence

from loraforge.registry.refs import parse_weighted


def apply_adapters(pipe, adapters: Sequence[tuple[object, float]], prefix: str = "lf") -> list[str]:
    """Load (LoraState, weight) pairs into `pipe` as named diffusers adapters and activate them."""
    from loraforge.formats import lora_to_diffusers

    names, weights = [], []
    for i, (state, weight) in enumerate(adapters):
        name = f"{prefix}{i}"
        state_dict, _meta = lora_to_diffusers(state)
        with warnings.catch_warnings():
            # PEFT warns each time a second adapter joins a model; several adapters are the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(dict(state_dict), adapter_name=name)
        names.append(name)
        weights.append(float(weight))
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return names


def load_pipeline_with_adapters(registry, base_ref: str, lora_specs: Sequence[str], device=None):
    """(pipeline, base, [(state, weight, manifest)]) for a base reference and `REF=W` adapter specs."""
    from loraforge.models.pipeline import load_pipeline
    from loraforge.registry.resolve import base_targets, load_adapter, resolve_base

    base = resolve_base(registry, base_ref)
    targets = base_targets(base)
    loaded = []
    for spec in lora_specs:
        ref, weight = parse_weighted(spec)
        state, manifest = load_adapter(registry, ref, base=base)
        if targets is not None:
            state.check_against(targets)
        loaded.append((state, weight, manifest))
    pipe = load_pipeline(base, device=device)
    apply_adapters(pipe, [(s, w) for s, w, _ in loaded])
    return pipe, base, loaded
