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

    A single file is read with the configs and tokenizers of a diffusers folder, in this order: `config` (or
    the base's own, with_config), checked to be of the file's architecture; the builtin tiny
    model of the same family when the file provably has its architecture (every tensor present with its
    shape); else diffusers' own lookup of the standard configs (its Hugging Face cache, or the Hub when
    online). When none is found the load is refused in one line naming the file and `--config DIR`.
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


def single_file_configs(base: BaseModel, home: Path | None = None) -> Path | None:
    """The diffusers folder whose configs single file `base` loads with: its --config, else the builtin of its
    family when the file has exactly that architecture; None: neither (diffusers' own lookup is left)."""
    if base.config is not None:
        return base.config
    builtin = ensure_builtin(_BUILTIN_OF_FAMILY[base.family], loraforge_home(home))
    return builtin if architecture_problem(base.path, builtin) is None else None


def _load_single_file(cls, base: BaseModel, dtype: torch.dtype, home: Path | None):
    config = single_file_configs(base, home)
    if config is not None:
        return cls.from_single_file(str(base.path), config=str(config), dtype=dtype, local_files_only=True)
    try:
        return cls.from_single_file(str(base.path), dtype=dtype)
    except Exception as exc:  # diffusers fetches the standard configs from the Hub: offline this fails
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnresolvedReference(
            f"cannot load single-file checkpoint {base.path.name}: its {base.family} configs and tokenizer are not "
            f"here ({reason[:120]}); pass --config DIR, a local diffusers folder of the same architecture, "
            "or connect to the network"
        ) from None


# ---- does a single file have a diffusers folder's architecture? --------------------------------------

_TEXT_MODEL = "text_model."


def architecture_problem(single_file: Path, folder: Path) -> str | None:
    """None when `single_file` has exactly the tensors of diffusers folder `folder`'s UNet, VAE and text
    encoders, by name and shape, after diffusers' own single-file conversion (run on shape-only meta
    tensors, so nothing but the header is read); else the first difference, in words."""
    single = _meta_checkpoint(single_file)
    for component, converted in _converted_components(single, Path(folder)):
        if isinstance(converted, str):
            return f"its {component} does not fit the folder's {component} config ({converted})"
        expected = {_strip_text_model(k): v for k, v in _folder_shapes(Path(folder) / component).items()
                    if not k.endswith("position_ids")}
        have = {_strip_text_model(k): tuple(v.shape) for k, v in converted.items() if not k.endswith("position_ids")}
        for key in sorted(expected):
            if key not in have:
                return f"the folder's {component}.{key} is missing from the file"
            if have[key] != expected[key]:
                return (f"{component}.{key} is {'x'.join(map(str, have[key]))} in the file but "
                        f"{'x'.join(map(str, expected[key]))} in the folder")
        extra = sorted(set(have) - set(expected))
        if extra:
            return f"the file has {component}.{extra[0]}, which the folder's {component} lacks"
    return None


def _strip_text_model(key: str) -> str:
    return key[len(_TEXT_MODEL):] if key.startswith(_TEXT_MODEL) else key


def _meta_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensor names with shape-only (meta) tensors: what the converters need, no weight read."""
    if Path(path).suffix.lower() == ".safetensors":
        from loraforge.formats.safetensors_io import tensor_shapes

        shapes = tensor_shapes(path)
    else:
        shapes = {k: tuple(v.shape) for k, v in _load_pickle_state_dict(path).items() if hasattr(v, "shape")}
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def _folder_shapes(component_dir: Path) -> dict[str, tuple[int, ...]]:
    from loraforge.formats.safetensors_io import tensor_shapes

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(component_dir.glob("*.safetensors")):
        shapes.update(tensor_shapes(file))
    return shapes


def _converted_components(checkpoint: dict, folder: Path):
    """(component, its diffusers state dict by diffusers' own converters, or why the conversion failed)."""
    import json
    from types import SimpleNamespace

    from diffusers.loaders import single_file_utils as sfu

    def config_of(component: str) -> dict:
        return json.loads((folder / component / "config.json").read_text(encoding="utf-8"))

    converters = {
        "unet": lambda: sfu.convert_ldm_unet_checkpoint(checkpoint, config_of("unet")),
        "vae": lambda: sfu.convert_ldm_vae_checkpoint(dict(checkpoint), config_of("vae")),
        "text_encoder": lambda: sfu.convert_ldm_clip_checkpoint(checkpoint),
        "text_encoder_2": lambda: sfu.convert_open_clip_checkpoint(
            SimpleNamespace(config=SimpleNamespace(**config_of("text_encoder_2"))), checkpoint,
            prefix="conditioner.embedders.1.model."),
    }
    for component, convert in converters.items():
        if not (folder / component).is_dir():
            continue
        try:
            yield component, convert()
        except (KeyError, IndexError, ValueError, RuntimeError, TypeError) as exc:
            yield component, f"{type(exc).__name__}: {str(exc)[:80]}"


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
