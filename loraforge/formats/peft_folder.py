"""PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`) ⇄ LoraState.

Layout we write: a PEFT adapter wraps one model, so an adapter with one component is written as
one PEFT folder, and an adapter with several components as one PEFT folder per component, named
after it (`unet/`, `text_encoder/`, `text_encoder_2/`) — the layout diffusers uses for pipelines.
The component of a single folder is recorded in the safetensors header (`loraforge.component`),
where PEFT ignores it; the config stays a plain `LoraConfig` so PEFT loads it unchanged. Factors
are stored untouched with the alphas in `lora_alpha`/`alpha_pattern`, so our own folders round
trip bit-exactly. Reading accepts both layouts and folders written by PEFT itself, with
`adapter_model.safetensors` or the older pickled `adapter_model.bin` (loaded weights-only); a folder with
no recorded component is the component it is named after (its own name, else the last part of PEFT's
`base_model_name_or_path`); else, for CLIP text-model modules, `text_encoder_2` when they include the projection,
`text_encoder` when they lack the `text_model.` wrapper (transformers 5's CLIPTextModel), `transformer` for Flux
transformer paths, `text_encoder_2` for T5 ones (`encoder.block.N…`, Flux's second encoder), and for wrapped paths
(either encoder in transformers 4, `text_encoder_2` in 5) the one encoder of the base whose module shapes they
fit, refused without a base or when both fit; any other folder is `unet`.

PEFT finds modules and weights by the names the model has in memory, so a text encoder's paths
are written as the installed transformers names them: CLIPTextModel (`text_encoder`) lost its
`text_model.` wrapper in transformers 5, CLIPTextModelWithProjection (`text_encoder_2`) kept it.
Reading restores canonical `text_model.` paths from either spelling.

A DoRA folder (`use_dora`, a `lora_magnitude_vector` per module) is read as DoRA modules around the LoRA
pairs, and DoRA modules over LoRA pairs are written back that way (use_dora per component folder).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from loraforge.errors import FormatError
from loraforge.formats import foreign_families
from loraforge.formats.adapter_format import AdapterFormat, FileProbe, ModuleNames, check_finite_tensors, register_format
from loraforge.formats.diffusers_lora import MAGNITUDE, check_dora, lora_or_dora, peft_alpha, peft_pairs
from loraforge.formats.flux_names import diffusers_module_of
from loraforge.formats.lora import (
    COMPONENTS, T5_ROOTS, TEXT_MODEL_PREFIX, TEXT_MODEL_ROOTS, LoraModule, LoraState, pair_names, with_text_model,
    without_text_model,
)
from loraforge.formats.pickles import load_weights_only
from loraforge.formats.safetensors_io import RawTensor, read_raw_safetensors, read_safetensors, write_safetensors

if TYPE_CHECKING:
    from torch import Tensor

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"  # what PEFT saved before it defaulted to safetensors
COMPONENT_KEY = "loraforge.component"
PREFIX = "base_model.model."


def peft_to_lora(sd: Mapping[str, Tensor], config: Mapping[str, Any], component: str) -> LoraState:
    """One component's PEFT state dict and config → LoraState."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise FormatError(f"PEFT adapters of type {peft_type} are not supported (only LORA)")
    downs, ups, magnitudes = {}, {}, {}
    for key, value in sd.items():
        path = key.removeprefix(PREFIX)
        if path.endswith(".lora_A.weight"):
            downs[path[: -len(".lora_A.weight")]] = value
        elif path.endswith(".lora_B.weight"):
            ups[path[: -len(".lora_B.weight")]] = value
        elif path.endswith(MAGNITUDE):
            magnitudes[path[: -len(MAGNITUDE)]] = value
        elif path.endswith(".lora_B.bias"):
            raise FormatError(f"key {key} is a lora_B bias (PEFT lora_bias=True), which loraforge does not import; "
                              "train the adapter without lora_bias")
        elif config.get("modules_to_save") and not path.rsplit(".", 1)[0].endswith((".lora_A", ".lora_B")):
            raise FormatError(f"key {key} is a whole weight PEFT saved for modules_to_save "
                              f"({', '.join(config['modules_to_save'])}), which loraforge does not import; "
                              "only LoRA factors are")
        else:
            raise FormatError(f"key {key} is not a PEFT LoRA weight (lora_A / lora_B / lora_magnitude_vector)")
    pair_names(downs, ups, {}, ".lora_A.weight", ".lora_B.weight")
    check_dora(downs, magnitudes, bool(config.get("use_dora")), PREFIX)
    state = LoraState()
    for path in sorted(downs):
        rank = int(downs[path].shape[0])
        alpha = peft_alpha(config, path, rank)
        canonical = with_text_model(path) if component.startswith("text_encoder") else path
        state[f"{component}.{canonical}"] = lora_or_dora(downs[path], ups[path], magnitudes.get(path),
                                                         rank if alpha is None else alpha, f"{component}.{canonical}")
    return state


def lora_to_peft(modules: Mapping[str, LoraModule]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One component's modules (path → LoraModule) → (PEFT state dict, LoraConfig kwargs)."""
    ranks = {p: m.rank for p, m in modules.items()}
    alphas = {p: m.alpha for p, m in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    sd: dict[str, Tensor] = {}
    for path in sorted(modules):
        sd[f"{PREFIX}{path}.lora_A.weight"] = modules[path].down.contiguous()
        sd[f"{PREFIX}{path}.lora_B.weight"] = modules[path].up.contiguous()
    config = {
        "r": r,
        "lora_alpha": _plain_number(lora_alpha),
        "target_modules": sorted(modules),
        "rank_pattern": {p: k for p, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {p: _plain_number(a) for p, a in sorted(alphas.items()) if a != lora_alpha},
    }
    return sd, config


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def is_peft_folder(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() or any((folder / c / CONFIG_NAME).is_file() for c in COMPONENTS)


def read_peft_folder(folder: Path, load: Callable[[Path], tuple[Mapping[str, Tensor | RawTensor], dict[str, str]]]
                     = read_safetensors, module_names: ModuleNames = None) -> tuple[LoraState, dict[str, str]]:
    """(state, header metadata of the first weights file) of a one- or many-component folder;
    `load` reads a weights file (`read_raw_safetensors` gives RawTensors, without torch); `module_names`: the
    base's modules per component (a mapping of module → weight shape, where known), which place a text-encoder
    folder that names no component."""
    folder = Path(folder)
    if (folder / CONFIG_NAME).is_file():
        parts = [(None, folder)]
    else:
        parts = [(c, folder / c) for c in COMPONENTS if (folder / c / CONFIG_NAME).is_file()]
    if not parts:
        raise FormatError(f"{folder} is not a PEFT adapter folder: no {CONFIG_NAME} in it or in {', '.join(COMPONENTS)}/")
    state, first_meta = LoraState(), None
    for component, sub in parts:
        weights = sub / WEIGHTS_NAME
        if not weights.is_file() and (sub / PICKLED_WEIGHTS_NAME).is_file():
            weights, load_part = sub / PICKLED_WEIGHTS_NAME, _load_pickled
        elif not weights.is_file():
            raise FormatError(f"{sub} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        else:
            load_part = load
        try:
            config = json.loads((sub / CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{sub / CONFIG_NAME} is not valid JSON: {e}") from e
        sd, meta = load_part(weights)
        foreign = foreign_families.refusal(str(weights), sd)
        if foreign:
            raise FormatError(foreign)
        component = (component or meta.get(COMPONENT_KEY) or _named_component(sub, config)
                     or _guess_component(sd, weights, module_names))
        if component not in COMPONENTS:
            raise FormatError(f"{weights}: unknown component {component!r} in the {COMPONENT_KEY} header entry")
        try:
            part = peft_to_lora(sd, config, component)
        except FormatError as e:
            raise FormatError(f"{weights}: {e}") from e
        for name, module in part.items():
            state[name] = module
        first_meta = first_meta if first_meta is not None else meta
    return state, dict(first_meta or {})


def _load_pickled(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """An `adapter_model.bin` (PEFT without safe_serialization), loaded without running pickled code."""
    from torch import Tensor

    sd = load_weights_only(path)
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise FormatError(f"{path} does not hold a flat dict of named tensors")
    check_finite_tensors(sd)
    return dict(sd), {}


def _named_component(folder: Path, config: Mapping[str, Any]) -> str | None:
    """The component a single folder names: its own name (`…/text_encoder_2`, a pipeline's layout), else the
    last part of the base model PEFT recorded (`base_model_name_or_path`, `…/text_encoder_2` when the model
    was loaded from a pipeline folder); None when neither is a component."""
    base = str(config.get("base_model_name_or_path") or "").replace("\\", "/").rstrip("/")
    for name in (folder.resolve().name, base.rsplit("/", 1)[-1]):
        if name in COMPONENTS:
            return name
    return None


def _guess_component(sd: Mapping[str, Tensor | RawTensor], weights: Path, module_names: ModuleNames) -> str:
    """`text_encoder_2` for CLIP text-model modules with the projection SDXL's second encoder has, `text_encoder`
    for ones without CLIP's `text_model.` wrapper (transformers 5 dropped it from CLIPTextModel only), the base's
    one encoder the modules fit for wrapped ones (`_fitting_encoders`), else `unet`."""
    paths = [k.removeprefix(PREFIX) for k in sd]
    if all(diffusers_module_of(p) is not None for p in paths):
        return "transformer"  # Flux's transformer (foreign_families has refused other transformers)
    if all(p.startswith(T5_ROOTS) for p in paths):
        return "text_encoder_2"  # Flux's T5
    if not all(p.startswith((TEXT_MODEL_PREFIX, *TEXT_MODEL_ROOTS, "text_projection")) for p in paths):
        return "unet"
    if any(p.startswith("text_projection") for p in paths):
        return "text_encoder_2"
    if not any(p.startswith(TEXT_MODEL_PREFIX) for p in paths):
        return "text_encoder"
    hint = "name the folder text_encoder or text_encoder_2 (or put it in one so named)"
    if module_names is None:
        raise FormatError(f"{weights}: a PEFT LoRA of CLIP text_model. modules naming no component could adapt "
                          f"text_encoder or text_encoder_2; {hint}, or import it with --base")
    fitting = _fitting_encoders(sd, module_names)
    if len(fitting) == 1:
        return fitting[0]
    why = ("both of the base's text encoders have its modules with its shapes" if fitting else
           "neither of the base's text encoders (text_encoder, text_encoder_2) has all its modules with its shapes")
    raise FormatError(f"{weights}: a PEFT LoRA of CLIP text_model. modules naming no component, and {why}; {hint}")


def _fitting_encoders(sd: Mapping[str, Tensor | RawTensor], module_names: Mapping[str, Any]) -> list[str]:
    """The text encoders of the base (`module_names`: component → module names, or module → weight shape) that
    have every module of PEFT state dict `sd`, with the input and output widths its factors have."""
    widths: dict[str, list] = {}
    for key, t in sd.items():
        path = key.removeprefix(PREFIX)
        for suffix, axis in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if path.endswith(suffix):
                widths.setdefault(with_text_model(path[: -len(suffix)]), [None, None])[axis] = int(t.shape[axis])
    fitting = []
    for component in ("text_encoder", "text_encoder_2"):
        modules = module_names.get(component)
        if modules is None:
            continue
        known = {with_text_model(m): (modules[m] if isinstance(modules, Mapping) else None) for m in modules}
        if all(p in known and (known[p] is None or (tuple(known[p][:1]) == (out,) and tuple(known[p][1:2]) == (inp,)))
               for p, (inp, out) in widths.items()):
            fitting.append(component)
    return fitting


@functools.cache
def _clip_text_model_is_wrapped() -> bool:
    """Whether the installed transformers builds CLIPTextModel inside a `text_model` wrapper (before 5)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                            vocab_size=4, max_position_embeddings=2, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):  # no memory, no initialisation: only the module tree is looked at
        return hasattr(CLIPTextModel(config), "text_model")


def _in_memory_modules(component: str, modules: Mapping[str, LoraModule]) -> dict[str, LoraModule]:
    """`modules` keyed by the paths PEFT will see in the installed transformers' model."""
    if component != "text_encoder" or _clip_text_model_is_wrapped():
        return dict(modules)
    return {without_text_model(path): m for path, m in modules.items()}


def write_peft_folder(state: LoraState, folder: Path, metadata: Mapping[str, str] | None = None) -> list[Path]:
    from peft import LoraConfig

    folder = Path(folder)
    components = state.components
    written: list[Path] = []
    for component in components:
        sub = folder if len(components) == 1 else folder / component
        sub.mkdir(parents=True, exist_ok=True)
        pairs, magnitudes = peft_pairs(_in_memory_modules(component, state.component(component)), component)
        sd, kwargs = lora_to_peft(pairs)
        if magnitudes:
            sd.update({f"{PREFIX}{path}{MAGNITUDE}": t.contiguous() for path, t in sorted(magnitudes.items())})
            kwargs["use_dora"] = True
        LoraConfig(**kwargs).save_pretrained(str(sub))
        header = {**(metadata or {}), "format": "pt", COMPONENT_KEY: component}
        written += [sub / CONFIG_NAME, write_safetensors(sd, sub / WEIGHTS_NAME, header)]
    return written


def _detect(probe: FileProbe) -> bool:
    if probe.container == "folder":
        return is_peft_folder(probe.path)
    if probe.container == "safetensors" and probe.keys and all(k.startswith(PREFIX) for k in probe.keys):
        raise FormatError(f"{probe.path} holds PEFT weights without their adapter_config.json; pass the adapter folder")
    return False


def _read(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    return read_peft_folder(path, module_names=module_names)


def _scan(path: Path, module_names: ModuleNames) -> tuple[LoraState, dict[str, str]]:
    return read_peft_folder(path, load=read_raw_safetensors, module_names=module_names)


register_format(AdapterFormat("peft", "PEFT adapter folder(s) (adapter_config.json)", _read, write_peft_folder, _detect,
                              scan=_scan, writes_variants=frozenset({"dora"})))
