"""Loading a base model as a diffusers pipeline, listing its LoRA targets, its DDIM scheduler, generating images."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from loraforge.errors import ConfigError, UnresolvedReference
from loraforge.home import loraforge_home
from loraforge.models.base import BaseModel, _load_pickle_state_dict, family_of_folder
from loraforge.models.builtin import ensure_builtin, quiet_progress_bars

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_BUILTIN_OF_FAMILY = {"sd1": "tiny-sd", "sdxl": "tiny-sdxl"}


def pick_device(prefer: str | None = None) -> torch.device:
    """`prefer` if given ("cpu", "cuda", "cuda:1"), else CUDA when available, else CPU."""
    if prefer:
        try:
            device = torch.device(prefer)
        except RuntimeError:
            raise ConfigError(f"unknown device {prefer!r}; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {prefer!r} requested but CUDA is not available here; use --device cpu")
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs that support it, else fp16 on CUDA; fp32 on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline
    if family == "sd1":
        return StableDiffusionPipeline
    raise ConfigError(f"unknown model family {family!r}; expected sd1 or sdxl")


def load_pipeline(
    base: BaseModel,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    config: str | Path | None = None,
    home: Path | None = None,
):
    """A StableDiffusion(XL)Pipeline for `base`, on `device` in `dtype`, with progress bars off.

    A single file is read with the configs and tokenizers of a diffusers folder (single_file_configs): `config`
    (or the base's own, with_config), checked to be of the file's architecture; the builtin tiny model of the
    same family when the file provably has its architecture (every tensor present with its shape); else the
    standard configs diffusers names for the file, from the Hub or its cache, checked the same way. When none
    is found or fits, the load is refused in one line naming the file and `--config DIR`.
    """
    device = pick_device(str(device) if device is not None else None)
    dtype = dtype or default_dtype(device)
    cls = _pipeline_class(base.family)
    if config is not None:
        base = with_config(base, config)
    with quiet_progress_bars():
        if base.layout == "diffusers":
            pipe = cls.from_pretrained(base.path, dtype=dtype)
        else:
            pipe = _load_single_file(cls, base, dtype, home)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def with_config(base: BaseModel, config: str | Path | None) -> BaseModel:
    """`base` read with the configs and tokenizers of diffusers folder `config` (None: unchanged).

    Refused in one line when `base` is not a single file (a folder has its own configs), when `config` is not
    a diffusers folder, or when it is of another family or architecture than the file (every tensor is
    compared by shape after diffusers' own single-file conversion; architecture_problem).
    """
    if config is None:
        return base
    folder = Path(config).expanduser()
    if base.layout != "single_file":
        raise ConfigError(f"--config {config} is for single-file bases; {base.ref} is a diffusers folder with its "
                          "own configs: drop --config")
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"--config {config} is not a diffusers pipeline folder (no model_index.json); "
                          "name a local diffusers folder of the same architecture as the base")
    family = family_of_folder(folder)
    if family != base.family:
        raise ConfigError(f"--config {config} holds an {family} pipeline but base {base.ref} is an {base.family} "
                          f"checkpoint; name an {base.family} diffusers folder")
    problem = architecture_problem(base.path, folder)
    if problem:
        raise ConfigError(f"--config {config} is not the architecture of {base.path.name}: {problem}")
    return dataclasses.replace(base, config=folder)


def single_file_configs(base: BaseModel, home: Path | None = None) -> Path:
    """The diffusers folder whose configs and tokenizers single file `base` loads with: its --config; else the
    builtin of its family when the file has exactly that architecture; else the configs (no weights) of the
    standard pipeline diffusers names for the file's model type, from the Hub or its local cache, checked
    against the file like a --config. Refused in one line when none fits."""
    if base.config is not None:
        return base.config
    builtin = ensure_builtin(_BUILTIN_OF_FAMILY[base.family], loraforge_home(home))
    if architecture_problem(base.path, builtin) is None:
        return builtin
    return _hub_configs(base)


# What a pipeline's configs and tokenizers are, without its weights.
HUB_CONFIG_PATTERNS = ["model_index.json", "*/config.json", "*/scheduler_config.json", "*/tokenizer_config.json",
                       "*/special_tokens_map.json", "*/vocab.json", "*/merges.txt"]


def _hub_configs(base: BaseModel) -> Path:
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from huggingface_hub import snapshot_download

    shapes = {k: torch.empty(s, device="meta") for k, s in _file_shapes(base.path).items()}
    repo = fetch_diffusers_config(shapes)["pretrained_model_name_or_path"]
    try:
        folder = Path(snapshot_download(repo, allow_patterns=HUB_CONFIG_PATTERNS))
    except Exception as exc:  # offline without a cached copy, HTTP errors: the configs are not here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnresolvedReference(
            f"cannot load single-file checkpoint {base.path.name}: its {base.family} configs and tokenizer "
            f"({repo} on the Hub) are not here ({reason[:100]}); pass --config DIR, a local diffusers folder of "
            "the same architecture, or connect to the network"
        ) from None
    family = family_of_folder(folder)
    problem = (f"it is {base.family} and they are {family}" if family != base.family
               else architecture_problem(base.path, folder))
    if problem:
        raise ConfigError(f"single-file checkpoint {base.path.name} does not fit {repo}, the standard configs "
                          f"diffusers names for it: {problem}; pass --config DIR of its architecture")
    return folder


def _load_single_file(cls, base: BaseModel, dtype: torch.dtype, home: Path | None):
    config = single_file_configs(base, home)
    pipe = cls.from_single_file(str(base.path), config=str(config), dtype=dtype, local_files_only=True)
    _load_converted_weights(pipe, base.path, config, dtype)
    return pipe


def _load_converted_weights(pipe, path: Path, folder: Path, dtype: torch.dtype) -> None:
    """Set every UNet, VAE and text-encoder weight of `pipe` from single file `path`, converted by
    models.single_file (diffusers' converter of each component) and loaded strictly.

    from_single_file alone is not enough: it chooses the text encoders' converter from tensor widths (an SDXL
    whose two encoders are equally wide gets text_encoder's weights in text_encoder_2) and loads non-strictly,
    leaving what it did not find at random or empty values.
    """
    from loraforge.errors import FormatError
    from loraforge.models import single_file as sf

    checkpoint = _read_checkpoint(path)
    family = family_of_folder(folder)
    keymap = sf.KeyMap.build({k: tuple(v.shape) for k, v in checkpoint.items()}, family,
                             sf.configs_from_folder(folder, family))
    for component, state in sf.to_diffusers(checkpoint, keymap).items():
        module = getattr(pipe, component)
        own = module.state_dict()
        if component.startswith("text_encoder") and not hasattr(module, "text_model"):
            state = {_strip_text_model(k): v for k, v in state.items()}  # transformers 5's flattened CLIPTextModel
        state = {k: v.to(dtype) for k, v in state.items() if k in own or not k.endswith(_DROPPED)}
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            which = f"lacks {component}.{missing[0]}" if missing else f"has {component}.{extra[0]}, unknown to it"
            raise FormatError(f"{path.name} does not load completely into the configs of {folder}: the file {which}")
        module.load_state_dict(state, strict=True, assign=True)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if Path(path).suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return {k: v for k, v in _load_pickle_state_dict(path).items() if isinstance(v, torch.Tensor)}


# ---- does a single file have a diffusers folder's architecture? --------------------------------------

_TEXT_MODEL = "text_model."
# Tensors diffusers' conversion leaves out on purpose: CLIP's position ids (rebuilt), open-clip's logit scale.
_DROPPED = ("position_ids", "logit_scale")


def architecture_problem(single_file: Path, folder: Path) -> str | None:
    """None when `single_file` has exactly the tensors of diffusers folder `folder`'s UNet, VAE and text
    encoders as its configs build them (config_shapes), by name and shape, after diffusers' own single-file
    conversion (models.single_file, run on shape-only tensors: nothing but the header is read), and no tensor of
    those parts the conversion leaves unused; else the first difference, in words."""
    from loraforge.errors import FormatError
    from loraforge.models import single_file as sf

    family = family_of_folder(folder)
    shapes = _file_shapes(single_file)
    try:
        keymap = sf.KeyMap.build(shapes, family, sf.configs_from_folder(folder, family))
    except FormatError as exc:
        return str(exc)
    have = {(p.component, _strip_text_model(p.key)): p.shape for ps in keymap.pieces.values() for p in ps
            if not p.key.endswith(_DROPPED)}
    want = {(c, _strip_text_model(k)): s for c, ks in config_shapes(folder, family).items() for k, s in ks.items()
            if not k.endswith(_DROPPED)}
    for component, key in sorted(want):
        if (component, key) not in have:
            return f"the folder's {component}.{key} is missing from the file"
        if have[component, key] != want[component, key]:
            return (f"{component}.{key} is {'x'.join(map(str, have[component, key]))} in the file but "
                    f"{'x'.join(map(str, want[component, key]))} in the folder")
    extra = sorted(set(have) - set(want))
    if extra:
        return f"the file has {extra[0][0]}.{extra[0][1]}, which the folder lacks"
    parts = tuple(sf.prefixes(family).values())
    unused = [k for k in shapes if k.startswith(parts) and not keymap.pieces.get(k) and not k.endswith(_DROPPED)]
    if unused:
        return f"the file's {unused[0]} has no place in the folder's configs"
    return None


def config_shapes(folder: Path, family: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """component → parameter → shape of the UNet, VAE and text encoders the folder's configs build (on the meta
    device, so nothing is allocated and the folder needs no weights), with the classes its model_index names."""
    import importlib
    import json

    from loraforge.models import single_file as sf

    index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    out = {}
    for component in sf.COMPONENTS[family]:
        library, class_name = (index.get(component) or [None, None])[:2]
        if not library or not class_name:
            continue  # a pipeline without it (the file's tensors of it, if any, then have no place)
        cls = getattr(importlib.import_module(library), class_name)
        where = Path(folder) / component
        with torch.device("meta"):
            if library == "transformers":
                module = cls(cls.config_class.from_pretrained(where))
            else:
                module = cls.from_config(cls.load_config(where))
        out[component] = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return out


def _strip_text_model(key: str) -> str:
    return key[len(_TEXT_MODEL):] if key.startswith(_TEXT_MODEL) else key


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if Path(path).suffix.lower() == ".safetensors":
        from loraforge.formats.safetensors_io import tensor_shapes

        return dict(tensor_shapes(path))
    return {k: tuple(v.shape) for k, v in _load_pickle_state_dict(path).items() if hasattr(v, "shape")}


def lora_target_names(pipe) -> dict[str, dict[str, tuple[int, ...]]]:
    """For unet / text_encoder / text_encoder_2: module path -> weight shape of every Linear and Conv2d."""
    targets: dict[str, dict[str, tuple[int, ...]]] = {}
    for component in LORA_COMPONENTS:
        module = getattr(pipe, component, None)
        if module is None:
            continue
        targets[component] = {
            name: tuple(sub.weight.shape)
            for name, sub in module.named_modules()
            if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d))
        }
    return targets


def generate(
    pipe,
    prompt: str,
    *,
    seed: int = 0,
    steps: int = 10,
    guidance: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
) -> Image.Image:
    """One image for `prompt`; the same seed gives the same image (the noise is drawn on CPU)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    result = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        negative_prompt=negative_prompt,
        cross_attention_kwargs=cross_attention_kwargs,
        generator=generator,
        output_type="pil",
    )
    return result.images[0]


def ddim_scheduler(scheduler_config) -> "object":
    """A DDIMScheduler with the training schedule (betas, prediction type) of the pipeline's scheduler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config)
