"""UNet block maps for per-block merge weights: IN00…, M00, OUT00… (SD1: 12+1+12, SDXL: 9+1+9).

Single files name the blocks directly (`input_blocks.N`, `middle_block`, `output_blocks.N`); diffusers
keys are mapped the way the original-to-diffusers conversion does: a down level holds
`layers_per_block` layers and a downsampler, an up level `layers_per_block + 1` layers (the last
one carrying the upsampler). Keys outside the blocks (time embedding, conv_out …) and the text
encoders use BASE.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Sequence, Union

from loraforge.errors import ConfigError

BASE = "BASE"
_LDM = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.|^(middle_block)\.")
_DIFF = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


def layers_per_block(unet_keys: Iterable[str]) -> int:
    """layers_per_block of a diffusers UNet, from its `down_blocks.0.resnets.J` keys."""
    js = [int(m.group(4)) for k in unet_keys if (m := _DIFF.match(k)) and m.group(1) == "down_blocks"
          and m.group(2) == "0" and m.group(3) == "resnets"]
    return max(js, default=0) + 1


def block_of(unet_key: str, layout: str, layers: int = 2) -> Optional[str]:
    """The block name of a UNet key (without prefix), or None when it belongs to BASE."""
    if layout != "diffusers":
        m = _LDM.match(unet_key)
        if not m:
            return None
        if m.group(3):
            return "M00"
        return ("IN" if m.group(1) == "input_blocks" else "OUT") + f"{int(m.group(2)):02d}"
    if unet_key.startswith("conv_in."):
        return "IN00"
    if unet_key.startswith("mid_block."):
        return "M00"
    m = _DIFF.match(unet_key)
    if not m:
        return None
    level, kind, j = int(m.group(2)), m.group(3), int(m.group(4))
    if m.group(1) == "down_blocks":
        n = (level + 1) * (layers + 1) if kind == "downsamplers" else 1 + level * (layers + 1) + j
        return f"IN{n:02d}"
    n = level * (layers + 1) + (layers if kind == "upsamplers" else j)
    return f"OUT{n:02d}"


def block_names(unet_keys: Sequence[str], layout: str) -> list[str]:
    """IN00…INxx, M00, OUT00…OUTxx present in a UNet, in order (without BASE)."""
    layers = layers_per_block(unet_keys) if layout == "diffusers" else 2
    found = {b for k in unet_keys if (b := block_of(k, layout, layers))}
    ins = sorted((b for b in found if b.startswith("IN")), key=lambda b: int(b[2:]))
    outs = sorted((b for b in found if b.startswith("OUT")), key=lambda b: int(b[3:]))
    return ins + (["M00"] if "M00" in found else []) + outs


def resolve_block_weights(weights: Union[Sequence[float], Mapping[str, float]], names: list[str],
                          default: float) -> dict[str, float]:
    """{block name or BASE: α}. A list gives every block in order, optionally with BASE first."""
    if isinstance(weights, Mapping):
        out = {}
        for key, value in weights.items():
            name = str(key).upper()
            if name != BASE and name not in names:
                raise ConfigError(f"unknown block {key!r} in block weights: this UNet has BASE, {', '.join(names)}")
            out[name] = float(value)
        return {BASE: out.get(BASE, default), **{n: out.get(n, default) for n in names}}
    values = [float(v) for v in weights]
    if len(values) == len(names):
        return {BASE: default, **dict(zip(names, values))}
    if len(values) == len(names) + 1:
        return {BASE: values[0], **dict(zip(names, values[1:]))}
    raise ConfigError(f"block weights have {len(values)} numbers but this UNet has {len(names)} blocks "
                      f"({names[0]}…{names[-1]}): give {len(names)} numbers, or {len(names) + 1} with BASE first")
