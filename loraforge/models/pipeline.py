"""Loading a base model as a diffusers pipeline, listing its LoRA targets, its DDIM scheduler, generating images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from loraforge.errors import ConfigError, UnresolvedReference
from loraforge.home import loraforge_home
from loraforge.models.base import BaseModel, _load_pickle_state_dict
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

    Single files need the configs of a diffusers folder: `config` if given, else the builtin tiny model of
    the same family when the checkpoint has its shapes, else diffusers' own lookup (which needs the network).
    """
    device = pick_device(str(device) if device is not None else None)
    dtype = dtype or default_dtype(device)
    cls = _pipeline_class(base.family)
    with quiet_progress_bars():
        if base.layout == "diffusers":
            pipe = cls.from_pretrained(base.path, dtype=dtype)
        else:
            pipe = _load_single_file(cls, base, dtype, config, home)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_single_file(cls, base: BaseModel, dtype: torch.dtype, config, home: Path | None):
    if config is None:
        builtin = ensure_builtin(_BUILTIN_OF_FAMILY[base.family], loraforge_home(home))
        if _single_file_matches_folder(base.path, builtin):
            config = builtin
    if config is not None:
        return cls.from_single_file(str(base.path), config=str(config), dtype=dtype, local_files_only=True)
    try:
        return cls.from_single_file(str(base.path), dtype=dtype)
    except Exception as exc:  # diffusers fetches the default config from the Hub: offline this fails
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnresolvedReference(
            f"cannot load single-file checkpoint {base.path.name} without its model configs ({reason[:160]}); "
            "pass a diffusers folder of the same architecture as config, or connect to the network"
        ) from None


# Single-file key -> (diffusers folder component, diffusers parameter) whose shapes must agree.
_SHAPE_PROBES = {
    "model.diffusion_model.input_blocks.0.0.weight": ("unet", "conv_in.weight"),
    "model.diffusion_model.time_embed.0.weight": ("unet", "time_embedding.linear_1.weight"),
    "first_stage_model.encoder.conv_in.weight": ("vae", "encoder.conv_in.weight"),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (
        "text_encoder", "text_model.embeddings.token_embedding.weight"),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (
        "text_encoder", "text_model.embeddings.token_embedding.weight"),
}


def _single_file_matches_folder(single_file: Path, folder: Path) -> bool:
    """True when the checkpoint's probe tensors have the shapes of the diffusers folder's weights."""
    single = _tensor_shapes(single_file, list(_SHAPE_PROBES))
    checked = 0
    for key, (component, name) in _SHAPE_PROBES.items():
        if key not in single:
            continue
        files = sorted((folder / component).glob("*.safetensors"))
        folder_shape = _tensor_shapes(files[0], [name]).get(name) if files else None
        if folder_shape != single[key]:
            return False
        checked += 1
    return checked > 0


def _tensor_shapes(path: Path, names: list[str]) -> dict[str, tuple[int, ...]]:
    if path.suffix.lower() == ".safetensors":
        from loraforge.formats.safetensors_io import tensor_shapes

        shapes = tensor_shapes(path)
        return {n: shapes[n] for n in names if n in shapes}
    state = _load_pickle_state_dict(path)
    return {n: tuple(state[n].shape) for n in names if n in state}


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
