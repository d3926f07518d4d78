"""diffusers LoRA state dicts (what `pipe.load_lora_weights` reads) ⇄ LoraState.

Reading accepts the PEFT-style keys diffusers writes today (`unet.<path>.lora_A.weight`), the
older attention-processor keys (`unet.<path>.processor.to_q_lora.down.weight`,
`text_encoder.<path>.q_proj.lora_linear_layer.down.weight`, `<path>.lora.down.weight`) and kohya
keys (delegated to `kohya.py`). Text-encoder paths are read into canonical `text_model.` form whether
the file was saved with or without that wrapper (diffusers under transformers 5 saves CLIPTextModel
paths without it). Alpha comes from `.alpha` keys, else from the
`lora_adapter_metadata` JSON diffusers keeps in the safetensors header (`<component>.lora_alpha`,
`.alpha_pattern`, `.rank_pattern`, `.use_rslora`), else alpha = rank as diffusers assumes. PEFT's DoRA
magnitudes (`….lora_magnitude_vector`) make DoRA modules, as `load_lora_weights` applies them.

Writing bakes scale = alpha/rank into lora_B, so a diffusers reader that assumes alpha = rank (plain
`load_lora_weights`, older diffusers) applies exactly the adapter's ΔW; the header's
`lora_adapter_metadata` says the same (lora_alpha = r). These files are for diffusers: ComfyUI leaves
their UNet attention keys unapplied (only part of the file takes effect there) while it applies the kohya
export fully, so ComfyUI and A1111 get kohya files (`export --for comfyui`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import FormatError
from loraforge.formats.adapter_format import (
    AdapterFormat, FileProbe, ModuleNames, read_finite_safetensors, register_format, scan_finite_safetensors,
)
from loraforge.formats.kohya import is_kohya_key, kohya_to_lora
from loraforge.formats.lora import (
    COMPONENTS, LoraModule, LoraState, alpha_value, module_from_tensors, pair_names, with_text_model, without_text_model,
)
from loraforge.formats.safetensors_io import write_safetensors

if TYPE_CHECKING:
    from torch import Tensor

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"

_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.", "add_embedding.")
_OLD_UNET_PROC = re.compile(r"^(?P<path>.+)\.processor\.(?P<proj>\w+?)_lora\.(?P<kind>down|up)\.weight$")
_OLD_TE_PROJ = re.compile(r"^(?P<path>.+)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<kind>down|up)\.weight$")
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".alpha", "alpha"),
    (".lora_magnitude_vector", "magnitude"),  # DoRA, as PEFT saves it
)
MAGNITUDE = ".lora_magnitude_vector"


def is_diffusers_key(key: str) -> bool:
    try:
        _parse_key(key)
    except FormatError:
        return False
    return True


def _parse_key(key: str) -> tuple[str, str]:
    """(canonical module name, 'down' | 'up' | 'alpha') of one diffusers key."""
    if "dora_scale" in key:
        raise FormatError(f"key {key} is a kohya/LyCORIS DoRA magnitude in a file of diffusers keys "
                          "(diffusers spells it lora_magnitude_vector)")
    if ".lora_B.bias" in key:
        raise FormatError(f"LoRA adapters with a lora_B bias are not supported (key {key})")
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        if key.startswith(_UNET_ROOTS) and ".processor." in key:
            component, rest = "unet", key  # the oldest files carry no `unet.` prefix
        else:
            raise FormatError(f"key {key} does not start with {', '.join(c + '.' for c in COMPONENTS)}")
    text_encoder = component.startswith("text_encoder")
    if text_encoder:
        rest = with_text_model(rest)  # diffusers with transformers 5 saves CLIPTextModel paths without it
    match = _OLD_UNET_PROC.match(rest)
    if match:
        proj = match["proj"]
        path = match["path"] + "." + ("to_out.0" if proj == "to_out" else proj)
        return f"{component}.{path}", match["kind"]
    match = _OLD_TE_PROJ.match(rest) if text_encoder else None
    if match:
        return f"{component}.{match['path']}.{_TE_PROJ[match['proj']]}", match["kind"]
    for suffix, kind in _SUFFIXES:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return f"{component}.{rest[: -len(suffix)]}", kind
    raise FormatError(f"key {key} is not a diffusers LoRA weight (lora_A / lora_B / alpha)")


def adapter_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """diffusers' flat `{component.field: value}` adapter metadata, from a safetensors header or as given."""
    if not metadata:
        return {}
    if LORA_ADAPTER_METADATA_KEY in metadata:
        raw = metadata[LORA_ADAPTER_METADATA_KEY]
        try:
            return json.loads(raw) if isinstance(raw, str) else dict(raw)
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise FormatError(f"the {LORA_ADAPTER_METADATA_KEY} header entry is not valid JSON: {e}") from e
    return {k: v for k, v in metadata.items() if k.split(".", 1)[0] in COMPONENTS}


def pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches the module path or a dotted suffix of it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def peft_alpha(config: Mapping[str, Any], path: str, rank: int) -> float | None:
    """The alpha in loraforge's meaning (scale = alpha/rank) that a PEFT config gives one module; None
    without a config (diffusers then takes alpha = rank). PEFT builds a `LoraConfig` from what it is given,
    so a config without `lora_alpha` gets LoraConfig's default, as PEFT and diffusers load it."""
    if not config:
        return None
    default = config["lora_alpha"] if "lora_alpha" in config else _peft_default_alpha()
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, path, default))
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank)  # rsLoRA scale alpha/√r expressed as an alpha over r
    return alpha


def check_dora(downs: Mapping[str, Any], magnitudes: Mapping[str, Any], use_dora: bool, prefix: str = "") -> None:
    """Raise FormatError unless the DoRA magnitudes and the config's `use_dora` agree, as PEFT loads them."""
    for name in sorted(set(magnitudes) - set(downs)):
        raise FormatError(f"{prefix}{name}{MAGNITUDE} has no LoRA weights")
    if magnitudes and not use_dora:
        name = min(magnitudes)
        raise FormatError(f"{prefix}{name}{MAGNITUDE} is a DoRA magnitude but the adapter config does not set "
                          "use_dora, so PEFT would not load it")
    if use_dora:
        for name in sorted(set(downs) - set(magnitudes)):
            raise FormatError(f"the adapter config sets use_dora but {prefix}{name} has no {MAGNITUDE[1:]}")


def lora_or_dora(down, up, magnitude, alpha: float, name: str):
    """A LoRA pair, or with PEFT's `lora_magnitude_vector` the DoRA module around it."""
    if magnitude is None:
        return LoraModule(down=down, up=up, alpha=alpha)
    return module_from_tensors({"lora_down.weight": down, "lora_up.weight": up, MAGNITUDE[1:]: magnitude}, alpha, name)


def _peft_default_alpha() -> float:
    from peft import LoraConfig  # only for the rare config without lora_alpha: PEFT owns the default

    return float(LoraConfig.__dataclass_fields__["lora_alpha"].default)


def diffusers_to_lora(sd: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None,
                      module_names: Mapping[str, Iterable[str]] | None = None) -> LoraState:
    if sd and all(is_kohya_key(k) for k in sd):
        return kohya_to_lora(sd, module_names)
    parts: dict[str, dict[str, Tensor]] = {"down": {}, "up": {}, "alpha": {}, "magnitude": {}}
    for key, value in sd.items():
        if is_kohya_key(key):
            raise FormatError(f"key {key} is a kohya key in a file of diffusers keys")
        name, kind = _parse_key(key)
        if name in parts[kind]:
            raise FormatError(f"two keys name the {kind} weight of {name} (one is {key})")
        parts[kind][name] = value
    downs, ups, alphas, magnitudes = parts["down"], parts["up"], parts["alpha"], parts["magnitude"]
    if not downs and not ups:
        raise FormatError("the state dict holds no LoRA weights")
    pair_names(downs, ups, alphas, ".lora_A.weight", ".lora_B.weight")

    meta = adapter_metadata(metadata)
    configs = {c: {k[len(c) + 1:]: v for k, v in meta.items() if k.startswith(c + ".")} for c in COMPONENTS}
    for component in COMPONENTS:
        prefix = component + "."
        in_component = {n: m for n, m in magnitudes.items() if n.startswith(prefix)}
        # with metadata diffusers builds the LoraConfig from it; without, it infers use_dora from the keys
        use_dora = bool(configs[component].get("use_dora")) if configs[component] else bool(in_component)
        check_dora({n: d for n, d in downs.items() if n.startswith(prefix)}, in_component, use_dora)
    state = LoraState()
    for name in sorted(downs):
        rank = int(downs[name].shape[0])
        component, path = name.split(".", 1)
        if name in alphas:
            alpha = alpha_value(alphas[name], name)
        else:
            alpha = peft_alpha(configs[component], path, rank)
            if alpha is None:
                alpha = float(rank)
        state[name] = lora_or_dora(downs[name], ups[name], magnitudes.get(name), alpha, name)
    return state


def peft_pairs(modules: Mapping[str, Any], component: str) -> tuple[dict[str, LoraModule], dict[str, Tensor]]:
    """(the LoRA pair of each module, PEFT's `lora_magnitude_vector` of each DoRA module) of one component.
    PEFT's `use_dora` covers a whole model and norms each output row of W + ΔW over a LoRA pair, so a
    component mixing DoRA and plain modules, or a DoRA module of another kind, is refused in one line."""
    doras = sorted(p for p, m in modules.items() if m.variant == "dora")
    plain = sorted(set(modules) - set(doras))
    fix = "export it as kohya or loraforge"
    if doras and plain:
        raise FormatError(f"{component} mixes DoRA modules ({component}.{doras[0]}) with plain ones "
                          f"({component}.{plain[0]}), but PEFT's use_dora covers a whole model; {fix}")
    pairs, magnitudes = {}, {}
    for path, m in modules.items():
        if m.variant != "dora":
            pairs[path] = m
            continue
        if m.inner_variant != "lora" or not m.wd_on_out:
            kind = f"a {m.inner_variant} module" if m.inner_variant != "lora" else "input columns"
            raise FormatError(f"DoRA module {component}.{path} normalises {kind}, which PEFT's DoRA cannot "
                              f"spell (a LoRA pair normalised per output row); {fix}")
        out = m.inner.weight_shape[0]
        magnitudes[path] = m.magnitude.reshape((1, out, 1, 1) if m.inner.is_conv else (out,))
        pairs[path] = m.inner
    return pairs, magnitudes


def lora_to_diffusers(state: LoraState) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(state dict, safetensors header metadata) that `load_lora_weights` loads as exactly ΔW."""
    import torch

    if "transformer" in state.components and "text_encoder_2" in state.components:
        raise FormatError("the adapter changes Flux's T5 encoder (text_encoder_2), and diffusers' FluxPipeline "
                          "loads LoRAs of the transformer and text_encoder (CLIP) only, leaving the rest unapplied; "
                          "export it as kohya (ComfyUI reads lora_te3_) or peft")

    sd: dict[str, Tensor] = {}
    use_dora: dict[str, bool] = {}
    for component in state.components:
        pairs, magnitudes = peft_pairs(state.component(component), component)
        use_dora[component] = bool(magnitudes)
        for path in sorted(pairs):
            m, name = pairs[path], f"{component}.{path}"
            up = m.up if m.scale == 1.0 else (m.up.to(torch.float32) * m.scale).to(m.up.dtype)
            sd[f"{name}.lora_A.weight"] = m.down.contiguous()
            sd[f"{name}.lora_B.weight"] = up.contiguous()
            if path in magnitudes:
                sd[f"{name}{MAGNITUDE}"] = magnitudes[path].contiguous()
    adapter_meta: dict[str, Any] = {}
    for component in state.components:
        if use_dora[component]:
            adapter_meta[f"{component}.use_dora"] = True
        # PEFT matches these names as suffixes. Text encoders lose the `text_model.` wrapper in
        # transformers 5, so the suffix without it matches both the old and the new module tree.
        ranks = {without_text_model(path): m.rank for path, m in state.component(component).items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {path: rank for path, rank in sorted(ranks.items()) if rank != r}
        adapter_meta.update({
            f"{component}.r": r,
            f"{component}.lora_alpha": r,
            f"{component}.rank_pattern": pattern,
            f"{component}.alpha_pattern": dict(pattern),
            f"{component}.target_modules": sorted(ranks),
        })
    return sd, {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_meta, indent=2, sort_keys=True)}


def _detect(probe: FileProbe) -> bool:
    return probe.container == "safetensors" and bool(probe.keys) and all(is_diffusers_key(k) for k in probe.keys)


def _read(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd, meta = read_finite_safetensors(path)
    return diffusers_to_lora(sd, meta, module_names), meta


def _scan(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    sd, meta = scan_finite_safetensors(path)
    return diffusers_to_lora(sd, meta, module_names), meta


def _write(state: LoraState, path: Path, metadata: Mapping[str, str]) -> list[Path]:
    sd, header = lora_to_diffusers(state)
    return [write_safetensors(sd, path, {**metadata, **header})]


register_format(AdapterFormat("diffusers", "diffusers load_lora_weights .safetensors (unet.….lora_A)",
                              _read, _write, _detect, scan=_scan, writes_variants=frozenset({"dora"})))
