"""kohya sd-scripts' Flux LoRA names (`networks/lora_flux.py`) ⇄ canonical Flux module names.

sd-scripts trains Flux on BFL's own model, so its keys flatten BFL module paths: `lora_unet_double_blocks_0_img_attn_qkv`,
`lora_unet_single_blocks_0_linear1`, `lora_unet_img_in`, `lora_unet_final_layer_adaLN_modulation_1`; the CLIP encoder
is `lora_te1_` (transformers' CLIPTextModel paths) and T5 `lora_te3_` (T5EncoderModel paths, `encoder_block_0_layer_0_
SelfAttention_q`). The fused modules are split into and fused from diffusers' modules by `flux_lora`; the kohya
format (`kohya.py`) reads and writes these files, choosing this naming when the keys (or the adapter) are Flux's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from loraforge.errors import FormatError, IncompatibleBaseError
from loraforge.formats.flux_lora import from_bfl, to_bfl
from loraforge.formats.flux_names import SINGLE_PREFIX, DOUBLE_PREFIX, flux_modules, kohya_flat
from loraforge.formats.kohya_names import flatten

UNET_PREFIX = "lora_unet_"
CLIP_PREFIX = "lora_te1_"
T5_PREFIX = "lora_te3_"
T5 = "text_encoder_2"
# The flattened BFL names outside the blocks (img_in, time_in_in_layer, final_layer_adaLN_modulation_1, ...).
_GLOBAL_FLATS = frozenset(kohya_flat(m.bfl) for m in flux_modules(0, 0))
_BLOCK_FLATS = (kohya_flat(DOUBLE_PREFIX), kohya_flat(SINGLE_PREFIX))
_FLAT_BLOCK = re.compile(r"^(double_blocks|single_blocks)_(\d+)_")
_T5_FLAT = re.compile(r"^encoder_block_(\d+)_layer_(\d+)_(SelfAttention_[qkvo]|DenseReluDense_(?:wi_0|wi_1|wi|wo))$")


def is_flux_flat(flat: str) -> bool:
    """Whether a flattened `lora_unet_` name is a BFL Flux module's."""
    return flat.startswith(_BLOCK_FLATS) or flat in _GLOBAL_FLATS


def is_flux_key(key: str) -> bool:
    """Whether a kohya key names a Flux transformer module (`lora_unet_double_blocks_…`, `lora_unet_img_in…`)."""
    return key.startswith(UNET_PREFIX) and is_flux_flat(key[len(UNET_PREFIX):].split(".", 1)[0])


def is_flux_file(keys: Iterable[str]) -> bool:
    """Whether kohya keys are a Flux LoRA's: any of them names a Flux transformer module."""
    return any(is_flux_key(k) for k in keys)


def _flat_index(flats: Iterable[str]) -> dict[str, str]:
    """{kohya flat name: BFL module name} for every module of a Flux transformer with the blocks `flats` reach."""
    double = single = 0
    for flat in flats:
        m = _FLAT_BLOCK.match(flat)
        if m and m.group(1) == "double_blocks":
            double = max(double, int(m.group(2)) + 1)
        elif m:
            single = max(single, int(m.group(2)) + 1)
    return {kohya_flat(m.bfl): m.bfl for m in flux_modules(double, single)}


def transformer_groups(modules: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{canonical name: {suffix: tensor}} of a Flux file's `lora_unet_` modules ({flat name: {suffix: tensor}}),
    fused BFL modules split into diffusers' modules."""
    index = _flat_index(modules)
    groups, labels = {}, {}
    for flat, tensors in modules.items():
        bfl = index.get(flat)
        if bfl is None:
            raise FormatError(f"kohya key {UNET_PREFIX}{flat} names no module of a Flux transformer "
                              "(double_blocks_N_…, single_blocks_N_…, img_in, txt_in, time_in_…, final_layer_…)")
        groups[bfl], labels[bfl] = tensors, f"kohya key {UNET_PREFIX}{flat}"
    return {f"transformer.{path}": tensors for path, tensors in from_bfl(groups, labels).items()}


def t5_path(flat: str, key: str, module_names: Mapping[str, Iterable[str]] | None) -> str:
    """The canonical T5 (`text_encoder_2`) path of a `lora_te3_` key's flattened name."""
    # a Flux base's T5 names the modules; another family's text_encoder_2 is no T5 (the family check says so)
    names = module_names.get(T5) if module_names and "transformer" in module_names else None
    if names is not None:
        exact = {flatten(p): p for p in names}
        if flat not in exact:
            raise IncompatibleBaseError(f"kohya key {key} matches no module of the base's {T5} (T5)")
        return exact[flat]
    m = _T5_FLAT.match(flat)
    if m is None:
        raise FormatError(f"cannot turn kohya key {key} into a T5 module path (encoder_block_N_layer_M_SelfAttention_q "
                          "… DenseReluDense_wo); pass the base model so its module names can be matched")
    return f"encoder.block.{m.group(1)}.layer.{m.group(2)}.{m.group(3).replace('_', '.', 1)}"


def key_bases(state, clip_key, flat_prefix: str | None = None) -> dict[str, Any]:
    """{kohya key before its suffix: module} of a Flux adapter: transformer modules under their (fused) BFL names, or
    under `flat_prefix` + their flattened diffusers paths (`lora_transformer_`, `lycoris_`: `flux_flat`'s files),
    T5 under `lora_te3_`, CLIP under the name `clip_key(canonical name)` gives."""
    if flat_prefix:
        out = {flat_prefix + flatten(n.split(".", 1)[1]): state[n] for n in state if n.startswith("transformer.")}
    else:
        out = {UNET_PREFIX + kohya_flat(bfl): m for bfl, m in to_bfl(state.component("transformer")).items()}
    for name in state:
        component, path = name.split(".", 1)
        if component == T5:
            out[T5_PREFIX + flatten(path)] = state[name]
        elif component != "transformer":
            out[clip_key(name)] = state[name]
    return out
