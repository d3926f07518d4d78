"""XLabs' Flux LoRAs (x-flux's attention processors: `double_blocks.0.processor.qkv_lora1.down.weight`) → LoraState.

x-flux adds a LoRA to each block's attention: in a double block `qkv_lora1`/`proj_lora1` on the image stream's
`img_attn.qkv`/`img_attn.proj` and `qkv_lora2`/`proj_lora2` on the text stream's `txt_attn.…`; in a single block
`qkv_lora` on the q, k, v rows of `linear1` (not its MLP rows) and `proj_lora` on `linear2`. Its layers scale by
1 (no alpha is saved), so alpha = rank. The qkv pairs split into diffusers' modules through `flux_lora`. Read
only: export such an adapter as kohya (ComfyUI) or diffusers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loraforge.errors import FormatError
from loraforge.formats.adapter_format import (
    AdapterFormat, FileProbe, ModuleNames, read_finite_safetensors, register_format, scan_finite_safetensors,
)
from loraforge.formats.flux_lora import DOWN, UP, qkv_only, split_fused
from loraforge.formats.flux_names import module_table
from loraforge.formats.lora import LoraState

_KEY = re.compile(r"^(?:diffusion_model\.)?(?P<block>double_blocks|single_blocks)\.(?P<i>\d+)\.processor\."
                  r"(?P<layer>qkv_lora1|proj_lora1|qkv_lora2|proj_lora2|qkv_lora|proj_lora)\.(?P<kind>down|up)\.weight$")
# x-flux's processor layer → the BFL module it adapts, per block kind
_LAYERS = {
    "double_blocks": {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj",
                      "qkv_lora2": "txt_attn.qkv", "proj_lora2": "txt_attn.proj"},
    "single_blocks": {"qkv_lora": "linear1", "proj_lora": "linear2"},
}


def _parse(key: str) -> tuple[str, str] | None:
    """(BFL module name, `lora_down.weight` | `lora_up.weight`) of an XLabs key; None for another key."""
    m = _KEY.match(key)
    if m is None or m["layer"] not in _LAYERS[m["block"]]:
        return None
    return f"{m['block']}.{m['i']}.{_LAYERS[m['block']][m['layer']]}", DOWN if m["kind"] == "down" else UP


def xlabs_to_lora(sd: Mapping[str, Any]) -> LoraState:
    groups: dict[str, dict[str, Any]] = {}
    labels: dict[str, str] = {}
    for key in sorted(sd):
        parsed = _parse(key)
        if parsed is None:
            raise FormatError(f"key {key} is not an XLabs Flux LoRA weight (double_blocks.N.processor.qkv_lora1.down."
                              "weight, …proj_lora2…, single_blocks.N.processor.qkv_lora / proj_lora)")
        module, suffix = parsed
        groups.setdefault(module, {})[suffix] = sd[key]
        labels.setdefault(module, f"key {key.rsplit('.', 2)[0]}")
    table = module_table(groups)
    grouped = {}
    for module, tensors in sorted(groups.items()):
        if set(tensors) != {DOWN, UP}:
            have = "down" if DOWN in tensors else "up"
            raise FormatError(f"{labels[module]}.{have}.weight has no matching "
                              f"{'up' if have == 'down' else 'down'}.weight")
        fm = table[module]
        if module.endswith(".linear1"):
            fm = qkv_only(fm)
        for path, parts in split_fused(fm, tensors, labels[module]).items():
            grouped[f"transformer.{path}"] = parts
    return LoraState.from_module_tensors(grouped)


def _detect(probe: FileProbe) -> bool:
    return probe.container == "safetensors" and bool(probe.keys) and all(_parse(k) for k in probe.keys)


def _read(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd, meta = read_finite_safetensors(path)
    return xlabs_to_lora(sd), meta


def _scan(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd, meta = scan_finite_safetensors(path)
    return xlabs_to_lora(sd), meta


def _write(state: LoraState, path: Path, metadata: Mapping[str, str]) -> list[Path]:
    raise FormatError("loraforge reads XLabs Flux LoRAs but does not write them; export as kohya (ComfyUI) "
                      "or diffusers")


register_format(AdapterFormat("xlabs", "XLabs (x-flux) Flux LoRA .safetensors (double_blocks.N.processor.qkv_lora1…); "
                                       "read only", _read, _write, _detect, scan=_scan))
