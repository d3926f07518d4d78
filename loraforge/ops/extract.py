"""`lora extract`: a LoRA from a fine-tuned checkpoint, ΔW = W_tuned − W_base per module, truncated SVD.

Modules are named by the diffusers layout: a single-file (or pickled `.ckpt`) input is read as a diffusers
folder through diffusers' own converters (`ops.checkpoints.ConvertedCheckpoint`), a Black Forest Labs Flux file
as a folder's transformer through its header (`ops.flux_layouts.FluxLayoutView`), so a single file, a folder
or one of each give the same adapter for the same weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch

from loraforge.errors import ConfigError, MergeError
from loraforge.formats.lora import LoraModule, LoraState
from loraforge.ops.checkpoints import Checkpoint, ConvertedCheckpoint, check_compatible, keymap_of
from loraforge.ops.flux_layouts import FluxLayoutView
from loraforge.ops.lowrank import check_rank_bound, choose_rank, dense_factors, dense_factors_flops
from loraforge.ops.threads import threads_for

from loraforge.families import ADAPTER_COMPONENTS as LORA_COMPONENTS, describe, family
# Token and position embedding tables are lookups, not linear layers a LoRA adapts; the UNet's time and
# class embeddings (`time_embedding.linear_1`) are Linear layers and are extracted like any other.
SKIP_SUFFIXES = ("token_embedding.weight", "position_embedding.weight")


def _extractable(ckey: str, shape, conv: bool) -> bool:
    folder, _, key = ckey.partition("/")
    if folder not in LORA_COMPONENTS or not key.endswith(".weight") or key.endswith(SKIP_SUFFIXES):
        return False
    return len(shape) == 2 or (conv and len(shape) == 4)


def extract_state(tuned: Checkpoint, base: Checkpoint, rank: int, rule: str = "fixed", value: Optional[float] = None,
                  conv: bool = False, randomized: Optional[bool] = None, min_diff: float = 1e-6,
                  progress: Callable[..., None] | None = None) -> LoraState:
    """LoraState of the per-module truncated SVDs of tuned − base (diffusers folders or views of single files
    as folders, see `diffusers_views`)."""
    if tuned.layout != "diffusers" or base.layout != "diffusers":
        raise ConfigError("lora extract needs diffusers folders (module names come from their layout)")
    components = {family(base.family).denoiser, "text_encoder"}
    if isinstance(tuned, FluxLayoutView) or isinstance(base, FluxLayoutView):
        components = {family(base.family).denoiser}  # a BFL Flux file holds the transformer alone
    check_compatible(base, tuned, components)
    candidates = [ckey for ckey in base.index
                  if base.component(ckey) in components and _extractable(ckey, base.info(ckey).shape, conv)]
    check_rank_bound(rank, max((min(s[0], math.prod(s[1:])) for s in (base.info(k).shape for k in candidates)),
                               default=0), "the largest min(out, in) of the layers that can be extracted")
    state = LoraState()
    for ckey in candidates:
        folder, _, key = ckey.partition("/")
        info = base.info(ckey)
        m, n = info.shape[0], math.prod(info.shape[1:])
        with threads_for(dense_factors_flops(m, n, rank, randomized)):
            delta = tuned.get(ckey).to(torch.float32) - base.get(ckey).to(torch.float32)
            if float(delta.abs().max()) <= min_diff:
                continue
            flat = delta.flatten(1)
            b, a, s = dense_factors(flat, rank, randomized=randomized)
            if rule != "fixed":
                r = choose_rank(s, rule, value, rank, total_energy=float((flat.double() ** 2).sum()))
                b, a = b[:, :r], a[:r]
        r = a.shape[0]
        down = a.reshape(r, *info.shape[1:]) if len(info.shape) == 4 else a
        up = b.reshape(b.shape[0], r, 1, 1) if len(info.shape) == 4 else b
        state[f"{folder}.{key[: -len('.weight')]}"] = LoraModule(down.contiguous(), up.contiguous(), float(r))
        if progress:
            progress()
    if not len(state):
        raise MergeError(f"{tuned.ref} does not differ from {base.ref} in any linear layer: nothing to extract")
    return state


def diffusers_views(tuned: Checkpoint, base: Checkpoint, configs: Optional[Path]) -> tuple:
    """(tuned, base) both in the diffusers layout. A single file is converted with the configs of `configs`,
    else of the other input when it is a folder (and spelled as that folder spells its keys); a Black Forest Labs
    Flux file is read as a folder's transformer through its own header (ops.flux_layouts)."""
    if tuned.family != base.family:
        raise MergeError(f"{tuned.ref} is {describe(tuned.family)} and {base.ref} is {describe(base.family)}: "
                         "a LoRA is extracted between checkpoints of one architecture")
    if tuned.family == "flux":
        return tuple(c if c.layout == "diffusers" else FluxLayoutView.as_diffusers(c) for c in (tuned, base))
    folder = base if base.layout == "diffusers" else tuned if tuned.layout == "diffusers" else None
    views = []
    for ckpt in (tuned, base):
        if ckpt.layout == "diffusers":
            views.append(ckpt)
            continue
        source = configs if configs is not None else folder.path
        views.append(ConvertedCheckpoint.as_diffusers(ckpt, keymap_of(ckpt, source), spelling=folder))
    return tuple(views)


def extract_lora(registry, tuned_ref: str, base_ref: str, *, name: str, rank: int, rule: str = "fixed",
                 value: Optional[float] = None, conv: bool = False, recipe=None, input_digest: str | None = None,
                 progress: Callable[..., None] | None = None, config: str | Path | None = None):
    """Extract and register LoRA `name` from `tuned_ref` against `base_ref`, each a diffusers folder, a
    single file or a `.ckpt`; `config`: a diffusers folder of the single files' architecture (needed when
    both are single files of another architecture than the builtin one's)."""
    from loraforge.ops.checkpoints import single_file_configs_folder
    from loraforge.registry.importer import adapter_info, register_adapter
    from loraforge.registry.manifest import BaseInfo, Manifest, Parent, Provenance
    from loraforge.registry.refs import check_name
    from loraforge.registry.resolve import resolve_base

    check_name(name)
    if rank <= 0:
        raise ConfigError(f"rank {rank} must be a positive integer")
    tuned_model, base_model = resolve_base(registry, tuned_ref), resolve_base(registry, base_ref)
    if config is not None and "single_file" not in (tuned_model.layout, base_model.layout):
        raise ConfigError(f"--config {config} names the configs of a single-file checkpoint, but {tuned_ref} and "
                          f"{base_ref} are diffusers folders: leave --config out")
    bfl = [m for m in (tuned_model, base_model) if m.layout == "single_file" and m.family == "flux"]
    if config is not None and bfl:
        raise ConfigError(f"--config {config}: {bfl[0].path.name} is a Black Forest Labs Flux file, whose tensors are "
                          "named by its own header; leave --config out")
    if config is None and not bfl and tuned_model.layout == base_model.layout == "single_file":
        config = single_file_configs_folder(base_model, registry.home)
    tuned = Checkpoint.open(tuned_model)
    base = Checkpoint.open(base_model)
    try:
        tuned_view, base_view = diffusers_views(tuned, base, Path(config) if config is not None else None)
        state = extract_state(tuned_view, base_view, rank, rule, value, conv, progress=progress)
    finally:
        tuned.close()
        base.close()
    parents = [Parent(ref=tuned.ref, digest=tuned.digest, role="model", weight=1.0),
               Parent(ref=base.ref, digest=base.digest, role="base", weight=-1.0)]
    manifest = Manifest(
        name=name, kind="lora", digest="", files=[], adapter=adapter_info(state, "loraforge"),
        base=BaseInfo(ref=base.ref, digest=base.digest, family=base.family),
        provenance=Provenance(method="extract", params={"rank": rank, "rule": rule, "value": value, "conv": conv},
                              parents=parents, recipe=recipe, source="extract"),
    )
    return register_adapter(registry, state, manifest, input_digest=input_digest)
