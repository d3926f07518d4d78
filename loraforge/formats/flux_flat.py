"""Flux LoRAs that flatten diffusers' transformer paths kohya-style: `lora_transformer_<path with _>` (OneTrainer and
other trainers on diffusers' FluxTransformer2DModel; diffusers' own Flux loader reads them) and LyCORIS' own network
on that transformer, `lycoris_<path with _>` (`lycoris_transformer_blocks_0_attn_to_q.lokr_w1`, `lycoris_x_embedder`).

Unlike sd-scripts' Flux names (`kohya_flux`), these name diffusers' modules, so each maps to one canonical
`transformer.<path>` module, LyCORIS variants included. A flat name is undone by looking it up among the flattened
paths of the Flux module table (`flux_names`) for the blocks the file reaches, never by guessing where a `_` was a
`.`; a name that is no Flux module is another transformer's, which `foreign_families` refuses. The kohya format
reads these keys beside `lora_te1_` (CLIP) and `lora_te3_` (T5) ones.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

from loraforge.errors import FormatError
from loraforge.formats.flux_names import flux_modules

TRANSFORMER_PREFIX = "lora_transformer_"
LYCORIS_PREFIX = "lycoris_"
PREFIXES = (TRANSFORMER_PREFIX, LYCORIS_PREFIX)
_FLAT_BLOCK = re.compile(r"^(single_transformer_blocks|transformer_blocks)_(\d+)_")


@functools.lru_cache(maxsize=64)
def _index(double: int, single: int) -> dict[str, str]:
    """{flattened diffusers path: diffusers path} of every module of a Flux transformer with these blocks."""
    return {d.replace(".", "_"): d for m in flux_modules(double, single) for d in m.diffusers}


def flat_index(flats: Iterable[str]) -> dict[str, str]:
    """{flattened path: diffusers path} for a Flux transformer with the blocks that the flattened paths reach."""
    double = single = 0
    for flat in flats:
        m = _FLAT_BLOCK.match(flat)
        if m and m.group(1) == "transformer_blocks":
            double = max(double, int(m.group(2)) + 1)
        elif m:
            single = max(single, int(m.group(2)) + 1)
    return _index(double, single)


def split_key(key: str) -> tuple[str, str, str] | None:
    """(prefix, flattened path, suffix) of a `lora_transformer_` / `lycoris_` key; None for other keys."""
    prefix = next((p for p in PREFIXES if key.startswith(p)), None)
    if prefix is None:
        return None
    flat, _, suffix = key[len(prefix):].partition(".")
    return prefix, flat, suffix


def module_path(key: str) -> str | None:
    """The diffusers path of the Flux transformer module a `lora_transformer_` / `lycoris_` key names; None when
    the key has neither prefix or names no Flux module (another transformer's, or a UNet's)."""
    parts = split_key(key)
    if parts is None:
        return None
    return flat_index([parts[1]]).get(parts[1])


def is_flux_key(key: str) -> bool:
    return module_path(key) is not None


def is_flux_file(keys: Iterable[str]) -> bool:
    """Whether any key names a Flux transformer module in diffusers' flattened spelling."""
    return any(is_flux_key(k) for k in keys)


def transformer_groups(modules: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{`transformer.<path>`: {suffix: tensor}} of {key before its suffix: {suffix: tensor}}; two spellings of one
    module (`lora_transformer_x_embedder` and `lycoris_x_embedder`) are refused."""
    index = flat_index(split_key(base)[1] for base in modules)
    out: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}
    for base, tensors in modules.items():
        _, flat, _ = split_key(base)
        path = index.get(flat)
        if path is None:
            raise FormatError(f"key {base} names no module of a Flux transformer (transformer_blocks_N_…, "
                              "single_transformer_blocks_N_…, x_embedder, context_embedder, time_text_embed_…, "
                              "norm_out_linear, proj_out)")
        if path in seen:
            raise FormatError(f"keys {seen[path]} and {base} name the same Flux module {path}; a file must name "
                              "each module once")
        seen[path] = base
        out[f"transformer.{path}"] = dict(tensors)
    return out
