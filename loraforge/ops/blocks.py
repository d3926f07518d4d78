"""Block maps for per-block merge weights. UNets: IN00…, M00, OUT00… (SD1: 12+1+12, SDXL: 9+1+9). Transformers
(Flux): the family's block groups and an index, `double.0`…`double.18`, `single.0`…`single.37` for FLUX.1; a
group's name alone (`double`) weighs all its blocks, a block named as well overrides it.

Single files name the blocks directly (`input_blocks.N`, `middle_block`, `output_blocks.N`); diffusers
keys are mapped the way the original-to-diffusers conversion does: a down level holds
`layers_per_block` layers and a downsampler, an up level `layers_per_block + 1` layers (the last
one carrying the upsampler). Flux's BFL names (`double_blocks.N`, `single_blocks.N`) are the same blocks as
diffusers' (`transformer_blocks.N`, `single_transformer_blocks.N`). Keys outside the blocks (time embedding,
conv_out, Flux's embedders and final layer …) and the text encoders use BASE.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

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


@dataclass(frozen=True)
class BlockMap:
    """The blocks of one denoiser: their names in order, its groups (group → its blocks) and the block of a key
    inside the denoiser (None: BASE)."""

    names: list[str]
    block_of: Callable[[str], Optional[str]]
    groups: dict[str, list[str]] = field(default_factory=dict)

    def describe(self) -> str:
        """BASE and the blocks, for messages: every name for UNets, each group's range for transformers."""
        if not self.groups:
            return ", ".join([BASE, *self.names])
        return ", ".join([BASE, *(f"{g} ({bs[0]}…{bs[-1]})" for g, bs in self.groups.items() if bs)])


def group_block_of(key: str, groups: Mapping[str, str], aliases: Mapping[str, str] = {}) -> Optional[str]:
    """`group.N` for a key under one of `groups` (group → path prefix of its blocks), `aliases` (another
    spelling's prefix → the group's prefix) read first; None outside the blocks."""
    for alias, prefix in aliases.items():
        if key.startswith(alias):
            key = prefix + key[len(alias):]
            break
    for group, prefix in groups.items():
        if key.startswith(prefix):
            index = key[len(prefix):].split(".", 1)[0]
            if index.isdigit():
                return f"{group}.{int(index)}"
    return None


def block_map(family_name: str, denoiser_keys: Sequence[str], layout: str) -> BlockMap:
    """The BlockMap of a denoiser of family `family_name` from its keys (in `layout`'s names)."""
    from loraforge.families import family

    fam = family(family_name)
    if not fam.is_transformer:
        layers = layers_per_block(denoiser_keys) if layout == "diffusers" else 2
        return BlockMap(block_names(denoiser_keys, layout), lambda k: block_of(k, layout, layers))
    from loraforge.formats.flux_names import DIFFUSERS_DOUBLE, DIFFUSERS_SINGLE, DOUBLE_PREFIX, SINGLE_PREFIX

    aliases = {DOUBLE_PREFIX: DIFFUSERS_DOUBLE, SINGLE_PREFIX: DIFFUSERS_SINGLE} if layout != "diffusers" else {}
    find = lambda k: group_block_of(k, fam.block_groups, aliases)  # noqa: E731
    found = {b for k in denoiser_keys if (b := find(k))}
    groups = {g: sorted((b for b in found if b.split(".")[0] == g), key=lambda b: int(b.split(".")[1]))
              for g in fam.block_groups}
    return BlockMap([b for bs in groups.values() for b in bs], find, groups)


def resolve_block_weights(weights: Union[Sequence[float], Mapping[str, float]], names: Union[list[str], BlockMap],
                          default: float) -> dict[str, float]:
    """{block name or BASE: α}. A list gives every block in order, optionally with BASE first; a mapping names
    blocks (any case) or, for a transformer, whole groups, which blocks named as well override."""
    blocks = names if isinstance(names, BlockMap) else BlockMap(list(names), lambda k: None)
    names = blocks.names
    if isinstance(weights, Mapping):
        canonical = {n.upper(): n for n in [BASE, *names]}
        groups = {g.upper(): bs for g, bs in blocks.groups.items()}
        out: dict[str, float] = {}
        for key, value in sorted(weights.items(), key=lambda kv: str(kv[0]).upper() not in groups):
            name = str(key).upper()
            if name in groups:
                out.update({b: float(value) for b in groups[name]})
            elif name in canonical:
                out[canonical[name]] = float(value)
            else:
                raise ConfigError(f"unknown block {key!r} in block weights: this model has {blocks.describe()}")
        return {BASE: out.get(BASE, default), **{n: out.get(n, default) for n in names}}
    values = [float(v) for v in weights]
    if len(values) == len(names):
        return {BASE: default, **dict(zip(names, values))}
    if len(values) == len(names) + 1:
        return {BASE: values[0], **dict(zip(names, values[1:]))}
    raise ConfigError(f"block weights have {len(values)} numbers but this model has {len(names)} blocks "
                      f"({names[0]}…{names[-1]}): give {len(names)} numbers, or {len(names) + 1} with BASE first")
