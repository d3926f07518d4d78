"""Fuse: bake weighted adapters into a base checkpoint, streamed one weight at a time."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch

from loraforge.errors import ConfigError, IncompatibleBaseError
from loraforge.formats.safetensors_io import SafetensorsWriter, dtype_from_name
from loraforge.models.base_config import keymap_targets
from loraforge.ops.checkpoints import Checkpoint
from loraforge.ops.merge import _artifact_files, _place_output, copy_folder_extras
from loraforge.ops.specs import FuseSpec


def fused_deltas(states_weights, name: str, base_weight: torch.Tensor | None = None) -> torch.Tensor | None:
    """Σ wᵢ·ΔWᵢ for one module (float32), or None when no adapter touches it. Each module gives its exact ΔW
    (LoHa, LoKr, full differences ...); a DoRA module needs `base_weight`, the weight before any adapter."""
    total = None
    for state, weight in states_weights:
        if name in state:
            d = state[name].delta(base_weight=base_weight) * weight
            total = d if total is None else total.add_(d.reshape(total.shape))
    return total


def fused_bias_deltas(states_weights, name: str) -> torch.Tensor | None:
    """Σ wᵢ·Δbᵢ for one module's bias (LyCORIS full `diff_b`, norm `b_norm`), or None when none changes it."""
    total = None
    for state, weight in states_weights:
        module = state.get(name)
        bias = module.bias_delta() if module is not None and hasattr(module, "bias_delta") else None
        if bias is not None:
            total = bias * weight if total is None else total.add_(bias * weight)
    return total


def fuse_tensor(states_weights, component: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Base tensor `key` of `component` with the adapters' weighted changes added (float32 when changed):
    `.weight` keys get ΔW, `.bias` keys the bias differences; anything else is returned as it is."""
    for suffix, deltas in ((".weight", fused_deltas), (".bias", fused_bias_deltas)):
        if key.endswith(suffix):
            name = f"{component}.{key[: -len(suffix)]}"
            delta = deltas(states_weights, name, tensor) if suffix == ".weight" else deltas(states_weights, name)
            if delta is not None:
                return tensor.to(torch.float32).add_(delta.reshape(tensor.shape))
    return tensor


def write_fused(base: Checkpoint, states_weights, out: Path, dtype: torch.dtype,
                progress: Callable[..., None] | None = None) -> Path:
    """Write base + Σ wᵢ·ΔWᵢ as a diffusers folder at `out`; untouched tensors keep their dtype,
    float tensors of LoRA-able components are stored in `dtype`."""
    copy_folder_extras(base.path, out, set(base.files))
    for rel, keys in base.file_layout():
        component = rel.split("/", 1)[0]
        entries = []
        for ckey, key in keys:
            info = base.info(ckey)
            entries.append((key, info.shape, dtype if info.is_float and component != "vae" else info.torch_dtype))
        with SafetensorsWriter(out / rel, entries, {"format": "pt"}) as writer:
            for (ckey, key), (_, _, want) in zip(keys, entries):
                tensor = fuse_tensor(states_weights, component, key, base.get(ckey))
                writer.write(key, tensor.to(want))
                if progress:
                    progress()
    return out


def _touched(states_weights, component: str, key: str) -> bool:
    name = f"{component}.{key.rsplit('.', 1)[0]}"
    return any(name in state for state, _ in states_weights)


def write_fused_single_file(base: Checkpoint, keymap, states_weights, out: Path, dtype: torch.dtype,
                            progress: Callable[..., None] | None = None) -> Path:
    """Write base + Σ wᵢ·ΔWᵢ as a single file at `out` with the base file's keys, order and dtypes; a tensor an
    adapter changes is stored in `dtype`. Each ΔW lands on the single-file tensor diffusers' converter reads that
    module from (a view of it for fused tensors such as the open-clip in_proj_weight's q/k/v, its rows of a Black
    Forest Labs Flux file's fused qkv or linear1). `keymap`: a models.single_file.KeyMap or, for a BFL Flux file,
    a models.flux_single_file.BflKeyMap."""
    (rel, keys), = base.file_layout()
    entries = []
    for ckey, key in keys:
        info = base.info(ckey)
        touched = info.is_float and any(_touched(states_weights, p.component, p.key) for p in keymap.pieces.get(key, []))
        entries.append((key, info.shape, dtype if touched else info.torch_dtype))
    with SafetensorsWriter(out, entries, {"format": "pt"}) as writer:
        for (ckey, key), (_, _, want) in zip(keys, entries):
            tensor = base.get(ckey)
            pieces = [p for p in keymap.pieces.get(key, []) if _touched(states_weights, p.component, p.key)]
            if pieces and tensor.is_floating_point():
                tensor = tensor.to(torch.float32)
                for piece in pieces:
                    piece.write_into(tensor, fuse_tensor(states_weights, piece.component, piece.key,
                                                         piece.read_from(tensor)))
            writer.write(key, tensor.to(want))
            if progress:
                progress()
    return out


def _check_transformer_only(state, file_name: str) -> None:
    """Refuse a Flux adapter (or one of text encoders alone) changing more than the transformer a BFL Flux file
    holds, naming its first such module; an adapter of another family is left to `check_against`, which names both."""
    from loraforge.families import family_of_components

    own = family_of_components(state.components)
    if own is not None and own.name != "flux":
        return
    other = sorted(name for name in state if not name.startswith("transformer."))
    if other:
        component = other[0].split(".", 1)[0]
        raise IncompatibleBaseError(f"module {other[0]} changes {component}, but {file_name} is a Black Forest Labs "
                                    "Flux file, the transformer alone: fuse the adapter into a diffusers Flux folder "
                                    "instead")


def fuse_loras(registry, spec: FuseSpec, *, name: str | None = None, output: str | Path | None = None,
               recipe=None, input_digest: str | None = None, progress: Callable[..., None] | None = None,
               config: str | Path | None = None):
    """Bake `spec.adapters` into `spec.base`; register checkpoint `name` and/or write `output`: a diffusers
    folder for a folder base, a single file in the base file's layout for a single-file base (`config`: a
    diffusers folder of its architecture, when it is not the builtin one's)."""
    from loraforge.home import tmp_dir
    from loraforge.ops.lora_merge import load_inputs
    from loraforge.registry.manifest import BaseInfo, Manifest, Parent, Provenance
    from loraforge.registry.refs import check_name
    from loraforge.registry.resolve import base_targets, resolve_base

    if name is None and output is None:
        raise ConfigError("give a name to register the fused checkpoint, or an output folder")
    if name is not None:
        check_name(name)
    dtype = dtype_from_name(spec.dtype)
    base_model = resolve_base(registry, spec.base)
    keymap = None
    bfl = base_model.layout != "diffusers" and base_model.family == "flux"
    if bfl and config is not None:
        raise ConfigError(f"--config {config}: {base_model.path.name} is a Black Forest Labs Flux file, whose tensors "
                          "are named by its own header; leave --config out")
    if base_model.layout != "diffusers" and not bfl:
        from loraforge.ops.checkpoints import single_file_configs_folder

        configs = single_file_configs_folder(base_model, registry.home, config)
    base = Checkpoint.open(base_model)
    try:
        if bfl:
            from loraforge.models.flux_single_file import BflKeyMap

            keymap = BflKeyMap.build({k: base.info(k).shape for k in base.index}, base_model.path.name)
        elif base_model.layout != "diffusers":
            from loraforge.ops.checkpoints import keymap_of

            # the shapes of the tensors just opened: a pickled base is not unpickled again for them
            keymap = keymap_of(base, configs)
        loaded = load_inputs(registry, spec.adapters, base=base_model)
        targets = base_targets(base_model) if keymap is None else keymap_targets(keymap)
        for state, _, ref, _ in loaded:
            try:
                if bfl:
                    _check_transformer_only(state, base_model.path.name)
                state.check_against(targets)
            except Exception as exc:
                raise type(exc)(f"{ref}: {exc}") from None
        with tempfile.TemporaryDirectory(dir=tmp_dir(registry.home), prefix="fuse-") as tmp:
            states_weights = [(s, a.weight) for (s, *_), a in zip(loaded, spec.adapters)]
            if keymap is None:
                staged = write_fused(base, states_weights, Path(tmp) / "fused", dtype, progress)
            else:
                staged = write_fused_single_file(base, keymap, states_weights, Path(tmp) / "fused.safetensors",
                                                 dtype, progress)
            result = _place_output(staged, Path(output).expanduser()) if output is not None else None
            if name is not None:
                parents = [Parent(ref=base.ref, digest=base.digest, role="base", weight=1.0)]
                parents += [Parent(ref=ref, digest=digest, role="adapter", weight=a.weight)
                            for (_, _, ref, digest), a in zip(loaded, spec.adapters)]
                manifest = Manifest(
                    name=name, kind="checkpoint", digest="", files=[], layout=base.layout,
                    base=BaseInfo(ref=base.ref, digest=base.digest, family=base.family),
                    provenance=Provenance(method="fuse", params={"dtype": spec.dtype}, parents=parents,
                                          recipe=recipe, source="fuse"),
                )
                result = registry.register(manifest, _artifact_files(staged, base.layout), input_digest=input_digest)
            return result
    finally:
        base.close()
