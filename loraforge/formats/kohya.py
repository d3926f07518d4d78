"""kohya / A1111 LoRA state dicts (`lora_unet_<path with _>.lora_down.weight`) ⇄ LoraState.

kohya flattens a module path by replacing every `.` with `_`, which is ambiguous to undo
(`down_blocks_0` could be `down.blocks.0`). With `module_names` (the real module paths of the base
model, per component) each key is matched exactly. Without them the key is split into the words of
diffusers' UNet2DConditionModel and transformers' CLIP text models (`down_blocks`, `to_q`,
`self_attn`, ...), longest word first; a key containing a word outside that vocabulary is refused
rather than guessed. Keys that use the original Stability (SGM) block names of kohya's SDXL UNet
(`input_blocks_4_1_...`) are refused with a message saying so: they are not mapped to diffusers yet.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from loraforge.errors import FormatError, IncompatibleBaseError
from loraforge.formats.adapter_format import (
    AdapterFormat, FileProbe, ModuleNames, read_finite_safetensors, register_format, scan_finite_safetensors,
)
from loraforge.formats.lora import LoraModule, LoraState, alpha_value, pair_names
from loraforge.formats.safetensors_io import TORCH_NAMES, write_safetensors

if TYPE_CHECKING:
    from torch import Tensor

DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"

# kohya prefix → canonical component, longest first so `lora_te1_` is not read as `lora_te_`.
PREFIXES = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te_": "text_encoder",
}

# Every path word of diffusers' UNet2DConditionModel and transformers' CLIPTextModel(WithProjection).
VOCABULARY = frozenset(
    """
    down_blocks up_blocks mid_block resnets attentions transformer_blocks downsamplers upsamplers
    attn1 attn2 to_q to_k to_v to_out add_q_proj add_k_proj add_v_proj to_add_out norm norm1 norm2 norm3
    ff net proj proj_in proj_out conv conv1 conv2 conv_shortcut conv_in conv_out conv_norm_out conv_act
    time_emb_proj time_embedding time_proj linear_1 linear_2 add_embedding add_time_proj class_embedding
    encoder_hid_proj
    text_model encoder layers self_attn q_proj k_proj v_proj out_proj layer_norm1 layer_norm2 mlp fc1 fc2
    embeddings token_embedding position_embedding final_layer_norm text_projection
    """.split()
)
_MAX_WORD_TOKENS = max(len(w.split("_")) for w in VOCABULARY)

UNSUPPORTED_MARKERS = {
    "hada_": "LoHa/LoKr adapters are not supported",
    "lokr_": "LoHa/LoKr adapters are not supported",
    ".lora_mid.": "LoCon adapters with a Tucker mid weight (lora_mid) are not supported",
    ".dora_scale": "DoRA adapters (dora_scale) are not supported",
    ".diff": "full-weight difference keys (.diff / .diff_b) are not supported",
}

SGM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_")

HINT_TE_PREFIX = "kohya_te_prefix"
HINT_ALPHA_DTYPE = "kohya_alpha_dtype"
HINT_NO_ALPHA = "kohya_alpha_omitted"
HINT_VALUES = {HINT_TE_PREFIX: ("lora_te_", "lora_te1_"), HINT_NO_ALPHA: ("1",)}


def check_hints(hints: Mapping[str, str]) -> None:
    """Raise FormatError unless every kohya hint has a value `lora_to_kohya` knows how to write."""
    for key, allowed in HINT_VALUES.items():
        if key in hints and hints[key] not in allowed:
            raise FormatError(f"hint {key} is {hints[key]!r}; expected one of {', '.join(allowed)}")
    dtype = hints.get(HINT_ALPHA_DTYPE)
    if dtype is not None and dtype not in TORCH_NAMES.values() and not _is_torch_dtype_name(dtype):
        raise FormatError(f"hint {HINT_ALPHA_DTYPE} is {dtype!r}, which is not a torch dtype name")


def _is_torch_dtype_name(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


def is_kohya_key(key: str) -> bool:
    return key.startswith(tuple(PREFIXES))


def split_words(flat: str) -> list[str] | None:
    """`down_blocks_0_attentions_0_proj_in` → ['down_blocks', '0', 'attentions', '0', 'proj_in'];
    None when a word is not in the vocabulary."""
    tokens = flat.split("_")
    words: list[str] = []
    i = 0
    while i < len(tokens):
        for j in range(min(len(tokens), i + _MAX_WORD_TOKENS), i, -1):
            word = "_".join(tokens[i:j])
            if word in VOCABULARY or (j == i + 1 and word.isdigit()):
                words.append(word)
                i = j
                break
        else:
            return None
    return words


def _split_key(key: str) -> tuple[str, str, str]:
    """(component, flattened path, suffix) of one kohya key."""
    for marker, message in UNSUPPORTED_MARKERS.items():
        if marker in key:
            raise FormatError(f"{message} (key {key})")
    for prefix, component in PREFIXES.items():
        if key.startswith(prefix):
            break
    else:
        raise FormatError(f"key {key} is not a kohya LoRA key (lora_unet_ / lora_te_ / lora_te1_ / lora_te2_)")
    for suffix in (DOWN, UP, ALPHA):
        if key.endswith(suffix):
            return component, key[len(prefix): -len(suffix)], suffix
    raise FormatError(f"key {key} is not a LoRA down/up weight or alpha")


def kohya_to_lora(sd: Mapping[str, Tensor], module_names: Mapping[str, Iterable[str]] | None = None) -> LoraState:
    """Read a kohya/A1111 state dict; a missing `.alpha` means alpha = rank."""
    exact = {c: {p.replace(".", "_"): p for p in paths} for c, paths in (module_names or {}).items()}
    downs, ups, alphas = {}, {}, {}
    te_prefixes = set()
    guessed: dict[tuple[str, str], str] = {}  # (component, flat path) → module path, shared by down/up/alpha
    for key, value in sd.items():
        component, flat, suffix = _split_key(key)
        if component != "unet":
            te_prefixes.add(key.split("_", 2)[1])
        if component in exact:
            path = exact[component].get(flat)
            if path is None:
                raise IncompatibleBaseError(f"kohya key {key} matches no module of the base's {component}")
        elif (component, flat) in guessed:
            path = guessed[component, flat]
        else:
            if component == "unet" and flat.startswith(SGM_BLOCKS):
                raise FormatError(
                    f"kohya key {key} uses the original SDXL (SGM) UNet block names "
                    "(input_blocks / middle_block / output_blocks), which loraforge cannot map to diffusers names yet"
                )
            words = split_words(flat)
            if words is None:
                raise FormatError(
                    f"cannot turn kohya key {key} into a module path: it has a name outside the diffusers/CLIP "
                    "vocabulary; pass the base model so its module names can be matched"
                )
            path = guessed[component, flat] = ".".join(words)
        name = f"{component}.{path}"
        {DOWN: downs, UP: ups, ALPHA: alphas}[suffix][name] = value
    if not downs and not ups:
        raise FormatError("the state dict holds no LoRA weights")
    pair_names(downs, ups, alphas, DOWN, UP)

    hints: dict[str, str] = {}
    if "te" in te_prefixes:
        hints[HINT_TE_PREFIX] = "lora_te_"
    elif te_prefixes:
        hints[HINT_TE_PREFIX] = "lora_te1_"
    if not alphas:
        hints[HINT_NO_ALPHA] = "1"
    else:
        alpha_dtypes = Counter(t.dtype for t in alphas.values())
        weight_dtypes = {name: downs[name].dtype for name in alphas}
        if any(t.dtype != weight_dtypes[n] for n, t in alphas.items()):
            hints[HINT_ALPHA_DTYPE] = str(alpha_dtypes.most_common(1)[0][0]).removeprefix("torch.")

    state = LoraState(hints=hints)
    for name in sorted(downs):
        alpha = alpha_value(alphas[name], name) if name in alphas else float(downs[name].shape[0])
        state[name] = LoraModule(down=downs[name], up=ups[name], alpha=alpha)
    return state


def lora_to_kohya(state: LoraState) -> dict[str, Tensor]:
    """Write kohya keys; factors keep their dtype, alpha is stored in the factors' dtype."""
    te_prefix = state.hints.get(HINT_TE_PREFIX)
    if "text_encoder_2" in state.components or te_prefix is None:
        te_prefix = "lora_te1_" if "text_encoder_2" in state.components else "lora_te_"
    prefixes = {"unet": "lora_unet_", "text_encoder": te_prefix, "text_encoder_2": "lora_te2_"}
    import torch

    alpha_dtype = state.hints.get(HINT_ALPHA_DTYPE)
    omit_default_alpha = HINT_NO_ALPHA in state.hints

    sd: dict[str, Tensor] = {}
    for name in sorted(state):
        m = state[name]
        component, path = name.split(".", 1)
        base = prefixes[component] + path.replace(".", "_")
        sd[base + DOWN] = m.down.contiguous()
        sd[base + UP] = m.up.contiguous()
        if omit_default_alpha and m.alpha == m.rank:
            continue
        dtype = getattr(torch, alpha_dtype) if alpha_dtype else m.down.dtype
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


register_format(AdapterFormat("kohya", "kohya / A1111 / ComfyUI .safetensors (lora_unet_…)", _read, _write, _detect,
                              scan=_scan))
