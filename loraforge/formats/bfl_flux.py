"""Flux LoRAs in Black Forest Labs' own module names (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`),
as ComfyUI saves them natively and BFL ships its control LoRAs (without the `diffusion_model.` wrapper) ⇄ LoraState.

Factors are `lora_A`/`lora_B` (ComfyUI also writes `lora_down`/`lora_up`), with an optional `.alpha` (alpha = rank
without it). The fused modules split into diffusers' modules and fuse back through `flux_lora`. BFL's control
LoRAs also carry whole norm scales (`….norm.query_norm.scale`) and LoRA biases (`….lora_B.bias`): new values of
base weights, not differences a LoRA adapter holds, so such a file is refused naming the key. Written files use
`diffusion_model.` and lora_A/lora_B with alpha, and hold the transformer only (BFL names no text encoder).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loraforge.errors import FormatError
from loraforge.formats.adapter_format import (
    AdapterFormat, FileProbe, ModuleNames, read_finite_safetensors, register_format, scan_finite_safetensors,
)
from loraforge.formats.flux_lora import ALPHA, DOWN, UP, from_bfl, to_bfl
from loraforge.formats.flux_names import BFL_WRAPPERS, module_table
from loraforge.formats.lora import LoraState
from loraforge.formats.safetensors_io import write_safetensors

WRAPPER = "diffusion_model."
_FACTORS = {"lora_A.weight": DOWN, "lora_B.weight": UP, "lora_down.weight": DOWN, "lora_up.weight": UP, "alpha": ALPHA}
# What BFL control LoRAs hold besides factors: values that replace base weights.
_REPLACEMENTS = ("lora_A.bias", "lora_B.bias", "scale", "bias")  # longest first


def _split(key: str) -> tuple[str, str] | None:
    """(BFL module name, suffix) of a key whose suffix is a factor's or a replacement's; None otherwise."""
    bare = key
    for wrapper in BFL_WRAPPERS:
        if bare.startswith(wrapper):
            bare = bare[len(wrapper):]
            break
    for suffix in (*_FACTORS, *_REPLACEMENTS):
        if bare.endswith("." + suffix):
            return bare[: -len(suffix) - 1], suffix
    return None


def _is_bfl_file(keys: tuple[str, ...]) -> bool:
    splits = [_split(k) for k in keys]
    if not keys or any(s is None for s in splits):
        return False
    table = module_table([s[0] for s in splits])
    return all(s[0] in table for s in splits)


def bfl_to_lora(sd: Mapping[str, Any]) -> LoraState:
    groups: dict[str, dict[str, Any]] = {}
    labels: dict[str, str] = {}
    for key in sorted(sd):
        module, suffix = _split(key)
        if suffix in _REPLACEMENTS:
            what = "a LoRA bias" if "lora_" in suffix else ("a norm scale" if suffix == "scale" else "a bias")
            raise FormatError(f"key {key} is {what} (a new value of the base weight, as BFL control LoRAs carry), "
                              "which a LoRA adapter cannot hold; loraforge imports only LoRA factors")
        tensors = groups.setdefault(module, {})
        if _FACTORS[suffix] in tensors:
            raise FormatError(f"two keys name the {_FACTORS[suffix]} of {module} (one is {key})")
        tensors[_FACTORS[suffix]] = sd[key]
        labels.setdefault(module, f"key {key}")
    for module, tensors in groups.items():
        for have, need in ((DOWN, UP), (UP, DOWN)):
            if have in tensors and need not in tensors:
                raise FormatError(f"{module} has a {have} factor but no {need}")
        if DOWN not in tensors:
            raise FormatError(f"{module}.alpha has no LoRA weights")
    grouped = {f"transformer.{path}": tensors for path, tensors in from_bfl(groups, labels).items()}
    return LoraState.from_module_tensors(grouped)


def lora_to_bfl(state: LoraState) -> dict[str, Any]:
    import torch

    others = [c for c in state.components if c != "transformer"]
    if others:
        raise FormatError(f"the bfl format holds a Flux transformer only, and the adapter also changes "
                          f"{', '.join(others)}; export it as kohya (ComfyUI) or diffusers")
    sd = {}
    for bfl, m in to_bfl(state.component("transformer")).items():
        if m.variant != "lora":
            raise FormatError(f"module {bfl} is a {m.variant} module, which the bfl format (lora_A/lora_B) cannot "
                              "spell; export it as kohya")
        sd[f"{WRAPPER}{bfl}.lora_A.weight"] = m.down.contiguous()
        sd[f"{WRAPPER}{bfl}.lora_B.weight"] = m.up.contiguous()
        sd[f"{WRAPPER}{bfl}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return sd


def _detect(probe: FileProbe) -> bool:
    return probe.container == "safetensors" and _is_bfl_file(probe.keys)


def _read(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd, meta = read_finite_safetensors(path)
    return bfl_to_lora(sd), meta


def _scan(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd, meta = scan_finite_safetensors(path)
    return bfl_to_lora(sd), meta


def _write(state: LoraState, path: Path, metadata: Mapping[str, str]) -> list[Path]:
    return [write_safetensors(lora_to_bfl(state), path, {"format": "pt", **metadata})]


register_format(AdapterFormat("bfl", "Black Forest Labs / ComfyUI-native Flux .safetensors "
                                     "(diffusion_model.double_blocks.….lora_A)", _read, _write, _detect, scan=_scan))
