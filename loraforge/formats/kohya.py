"""kohya / A1111 LoRA state dicts (`lora_unet_<path with _>.lora_down.weight`) ⇄ LoraState.

This module handles the key suffixes and tensors; the names before them are `kohya_names`' work.
kohya flattens a module path by replacing every `.` with `_`, which is ambiguous to undo
(`down_blocks_0` could be `down.blocks.0`). With `module_names` (the real module paths of the base
model, per component) each key is matched exactly. Without them the key is split into the words of
diffusers' UNet2DConditionModel and transformers' CLIP text models (`down_blocks`, `to_q`,
`self_attn`, ...), longest word first; a key containing a word outside that vocabulary is refused
rather than guessed. SDXL files that use the Stability (SGM) UNet block names kohya trains SDXL with
(`input_blocks_4_1_…`, `middle_block_…`, `output_blocks_…`) are mapped to diffusers paths by
diffusers' own converter, and written back in SGM names: the hints remember the naming.

Flux files (kohya sd-scripts' `networks/lora_flux.py`: `lora_unet_double_blocks_0_img_attn_qkv`, `lora_te1_` CLIP,
`lora_te3_` T5) name BFL's modules; `kohya_flux` maps them, splitting the fused ones into diffusers' modules, and an
adapter with a `transformer` is written back in those names, so `export --for comfyui` of a Flux adapter gives them.
Flux files that flatten diffusers' paths instead (`lora_transformer_…`, LyCORIS' `lycoris_…`) are `flux_flat`'s: one
module per key, no fusing; an import of one is written back in its own spelling.

After the name comes the suffix, `.lora_down.weight` / `.lora_up.weight` / `.alpha` for a LoRA pair and
LyCORIS' own for its variants (`.hada_w1_a`, `.lokr_w2`, `.lora_mid.weight`, `.dora_scale`, `.diff`,
`.w_norm`, ...); a module's tensors are kept under those suffixes, so writing it back gives the same tensors.
A DoRA read from PEFT or diffusers (`lora_magnitude_vector`) is written with LyCORIS' `.dora_scale`, shaped
out×1… as lycoris saves it, the only DoRA magnitude ComfyUI, A1111 and lycoris read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from loraforge.errors import FormatError
from loraforge.formats import flux_flat, kohya_flux
from loraforge.formats.adapter_format import (
    AdapterFormat, FileProbe, ModuleNames, read_finite_safetensors, register_format, scan_finite_safetensors,
)
from loraforge.formats.kohya_names import (
    HINT_UNET_NAMES, NAMINGS, PREFIXES, KeyWriter, PathReader, check_sgm_hints, split_prefix, text_encoder_prefix,
)
from loraforge.formats.lora import MODULE_SUFFIXES, LoraState
from loraforge.formats.safetensors_io import TORCH_NAMES, write_safetensors

if TYPE_CHECKING:
    from torch import Tensor

DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"
SUFFIXES = frozenset(MODULE_SUFFIXES)  # without the leading dot
NORM_SUFFIXES = frozenset({"w_norm", "b_norm"})

HINT_TE_PREFIX = "kohya_te_prefix"
HINT_ALPHA_DTYPE = "kohya_alpha_dtype"
HINT_NO_ALPHA = "kohya_alpha_omitted"
HINT_FLUX_FLAT = "kohya_flux_diffusers_prefix"  # a Flux import's transformer keys flattened diffusers paths
HINT_VALUES = {HINT_TE_PREFIX: ("lora_te_", "lora_te1_"), HINT_NO_ALPHA: ("1",), HINT_UNET_NAMES: NAMINGS,
               HINT_FLUX_FLAT: flux_flat.PREFIXES}


def check_hints(hints: Mapping[str, str]) -> None:
    """Raise FormatError unless every kohya hint has a value `lora_to_kohya` knows how to write."""
    for key, allowed in HINT_VALUES.items():
        if key in hints and hints[key] not in allowed:
            raise FormatError(f"hint {key} is {hints[key]!r}; expected one of {', '.join(allowed)}")
    check_sgm_hints(hints)
    dtype = hints.get(HINT_ALPHA_DTYPE)
    if dtype is not None and dtype not in TORCH_NAMES.values() and not _is_torch_dtype_name(dtype):
        raise FormatError(f"hint {HINT_ALPHA_DTYPE} is {dtype!r}, which is not a torch dtype name")


def _is_torch_dtype_name(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


def is_kohya_key(key: str) -> bool:
    return key.startswith(tuple(PREFIXES)) or flux_flat.is_flux_key(key)


def _split_key(key: str) -> tuple[str, str, str]:
    """(component, flattened path, suffix without its dot) of one kohya key; the flattened path has no dots."""
    component, rest = split_prefix(key)
    flat, _, suffix = rest.partition(".")
    _check_suffix(key, suffix)
    return component, flat, suffix


def _check_suffix(key: str, suffix: str) -> None:
    if suffix not in SUFFIXES:  # "" for a key without one
        raise FormatError(f"key {key} ends in no suffix of a LoRA or LyCORIS module (known: "
                          f"{', '.join(sorted(SUFFIXES))})")


def kohya_to_lora(sd: Mapping[str, Tensor], module_names: Mapping[str, Iterable[str]] | None = None) -> LoraState:
    """Read a kohya/A1111 (or LyCORIS) state dict; a missing `.alpha` means alpha = rank."""
    paths = PathReader(sd, module_names)
    grouped: dict[str, dict[str, Tensor]] = {}
    te_prefixes = set()
    flux = kohya_flux.is_flux_file(sd)
    flux_t5 = flux or flux_flat.is_flux_file(sd)  # lora_te3_ is T5 beside Flux transformer keys in either naming
    flux_modules: dict[str, dict[str, Tensor]] = {}  # a Flux file's lora_unet_ modules by flat BFL name
    flat_modules: dict[str, dict[str, Tensor]] = {}  # lora_transformer_ / lycoris_ modules by key before the suffix
    for key, value in sd.items():
        flat_parts = flux_flat.split_key(key)
        if flat_parts is not None:
            prefix, flat, suffix = flat_parts
            _check_suffix(key, suffix)
            flat_modules.setdefault(prefix + flat, {})[suffix] = value
            continue
        component, flat, suffix = _split_key(key)
        if component != "unet":
            te_prefixes.add(text_encoder_prefix(key))
        if flux and component == "unet":
            flux_modules.setdefault(flat, {})[suffix] = value
            continue
        if key.startswith(kohya_flux.T5_PREFIX):
            if not flux_t5:
                raise FormatError(f"kohya key {key} is a T5 key (lora_te3_), which a Flux LoRA holds beside its "
                                  "lora_unet_double_blocks_… keys; this file has no Flux transformer keys")
            path = kohya_flux.t5_path(flat, key, module_names)
        else:
            # Norm layers (LyCORIS w_norm / b_norm) have 1-D weights, which a base's module names need not list:
            # their paths are read from the diffusers/CLIP vocabulary, and `check_against` finds the layer or says so.
            path = paths.module_path(component, flat, key, exact=suffix not in NORM_SUFFIXES)
        grouped.setdefault(f"{component}.{path}", {})[suffix] = value
    if flux:
        grouped.update(kohya_flux.transformer_groups(flux_modules))
    flat_prefix = _flat_prefix(flat_modules, flux_modules)
    grouped.update(flux_flat.transformer_groups(flat_modules))
    alphas = {name: t[ALPHA[1:]] for name, t in grouped.items() if ALPHA[1:] in t}
    if not any(set(t) - {ALPHA[1:]} for t in grouped.values()):
        raise FormatError("the state dict holds no LoRA weights")

    hints: dict[str, str] = paths.hints()
    if "lora_te_" in te_prefixes:
        hints[HINT_TE_PREFIX] = "lora_te_"
    elif te_prefixes:
        hints[HINT_TE_PREFIX] = "lora_te1_"
    if flat_prefix:
        hints[HINT_FLUX_FLAT] = flat_prefix
    if not alphas:
        hints[HINT_NO_ALPHA] = "1"
    else:
        alpha_dtypes = Counter(t.dtype for t in alphas.values())
        weight_dtypes = {name: _weight_dtype(grouped[name], name) for name in alphas}
        if any(t.dtype != weight_dtypes[n] for n, t in alphas.items()):
            hints[HINT_ALPHA_DTYPE] = str(alpha_dtypes.most_common(1)[0][0]).removeprefix("torch.")
    return LoraState.from_module_tensors(grouped, hints=hints)


def _flat_prefix(flat_modules: Mapping[str, object], bfl_modules: Mapping[str, object]) -> str | None:
    """The one prefix (`lora_transformer_` or `lycoris_`) a file's diffusers-flattened Flux keys use; a file that
    also names BFL modules (`lora_unet_double_blocks_…`) or mixes both prefixes is refused."""
    if not flat_modules:
        return None
    prefixes = sorted({next(p for p in flux_flat.PREFIXES if base.startswith(p)) for base in flat_modules})
    first = min(flat_modules)
    if bfl_modules:
        raise FormatError(f"kohya keys {first} (diffusers' Flux names) and lora_unet_{min(bfl_modules)} (Black Forest "
                          "Labs' names) are both in the file; a file must use one naming")
    if len(prefixes) > 1:
        raise FormatError(f"the file names Flux modules both as {prefixes[0]}… and as {prefixes[1]}…; a file must use "
                          "one prefix")
    return prefixes[0]


def _weight_dtype(tensors: Mapping[str, Tensor], name: str):
    """The dtype of a module's first tensor other than alpha (the one its alpha is written in)."""
    for suffix in sorted(tensors):
        if suffix != ALPHA[1:]:
            return tensors[suffix].dtype
    raise FormatError(f"{name}{ALPHA} has no LoRA weights")


def lora_to_kohya(state: LoraState) -> dict[str, Tensor]:
    """Write kohya keys; factors keep their dtype, alpha is stored in the factors' dtype. UNet paths
    are written in the naming the hints say (SGM for an SGM-named import), diffusers' otherwise."""
    import torch

    if "transformer" in state.components:  # Flux: BFL module names, fused modules fused (kohya_flux)
        clip = KeyWriter({HINT_TE_PREFIX: kohya_flux.CLIP_PREFIX, **state.hints}, ["text_encoder"], [])
        modules = kohya_flux.key_bases(state, clip.key_base, state.hints.get(HINT_FLUX_FLAT))
    else:
        names = KeyWriter(state.hints, state.components, [n.split(".", 1)[1] for n in state if n.startswith("unet.")])
        modules = {names.key_base(name): state[name] for name in state}
    alpha_dtype = state.hints.get(HINT_ALPHA_DTYPE)
    omit_default_alpha = HINT_NO_ALPHA in state.hints

    sd: dict[str, Tensor] = {}
    for base in sorted(modules):
        m = modules[base]
        if m.variant == "dora":
            m = m.as_dora_scale()  # PEFT's lora_magnitude_vector is a key ComfyUI, A1111 and lycoris ignore
        tensors = m.file_tensors()
        for suffix, t in tensors.items():
            sd[f"{base}.{suffix}"] = t.contiguous()
        if m.alpha is None or (omit_default_alpha and m.variant == "lora" and m.alpha == m.rank):
            continue
        dtype = getattr(torch, alpha_dtype) if alpha_dtype else tensors[min(tensors)].dtype
        sd[base + ALPHA] = torch.tensor(m.alpha, dtype=dtype)
    return sd


def _detect(probe: FileProbe) -> bool:
    return probe.container == "safetensors" and bool(probe.keys) and all(is_kohya_key(k) for k in probe.keys)


def _read(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd, meta = read_finite_safetensors(path)
    return kohya_to_lora(sd, module_names), meta


def _scan(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd, meta = scan_finite_safetensors(path)
    return kohya_to_lora(sd, module_names), meta


def _write(state: LoraState, path: Path, metadata: Mapping[str, str]) -> list[Path]:
    return [write_safetensors(lora_to_kohya(state), path, {"format": "pt", **metadata})]


register_format(AdapterFormat("kohya", "kohya / A1111 / ComfyUI .safetensors (lora_unet_…, LyCORIS lora_unet_….hada_…; "
                                        "Flux: lora_unet_double_blocks_…, lora_transformer_…, lycoris_…)",
                              _read, _write, _detect, scan=_scan, writes_variants=True))
