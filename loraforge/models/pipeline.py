"""Loading a base model as a diffusers pipeline, listing its LoRA targets, its DDIM scheduler, generating images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from loraforge.errors import ConfigError, UnresolvedReference
from loraforge.models.base import BaseModel, _load_pickle_state_dict, family_of_folder
from loraforge.models.base_config import DROPPED_KEYS, single_file_configs, strip_text_model, with_config
from loraforge.models.builtin import quiet_progress_bars

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


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

    A single file is read with the configs and tokenizers of a diffusers folder (base_config.single_file_configs): `config`
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
            state = {strip_text_model(k): v for k, v in state.items()}  # transformers 5's flattened CLIPTextModel
        state = {k: v.to(dtype) for k, v in state.items() if k in own or not k.endswith(DROPPED_KEYS)}
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            which = f"lacks {component}.{missing[0]}" if missing else f"has {component}.{extra[0]}, unknown to it"
            raise FormatError(f"{path.name} does not load completely into the configs of {folder}: the file {which}")
        module.load_state_dict(state, strict=True, assign=True)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if Path(path).suffix.lower() == ".safetensors":
        from loraforge.formats.safetensors_io import read_safetensors

        return read_safetensors(Path(path))[0]
    return {k: v for k, v in _load_pickle_state_dict(path).items() if isinstance(v, torch.Tensor)}


def lora_target_names(pipe, with_norms: bool = False) -> dict[str, dict[str, tuple[int, ...]]]:
    """For unet / text_encoder / text_encoder_2: module path -> weight shape of every Linear and Conv2d, and with
    `with_norms` of every GroupNorm/LayerNorm with a weight (1-D), which LyCORIS norm modules adapt."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d, *((torch.nn.GroupNorm, torch.nn.LayerNorm) if with_norms else ()))
    targets: dict[str, dict[str, tuple[int, ...]]] = {}
    for component in LORA_COMPONENTS:
        module = getattr(pipe, component, None)
        if module is None:
            continue
        targets[component] = {
            name: tuple(sub.weight.shape)
            for name, sub in module.named_modules()
            if isinstance(sub, kinds) and getattr(sub, "weight", None) is not None
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
    check_steps(pipe, steps)
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


def check_steps(pipe, steps: int) -> None:
    """Refuse, in one line, more denoising steps than the timesteps the model was trained on (the schedulers
    cannot space them: diffusers raises, or fails on the last index)."""
    trained = getattr(pipe.scheduler.config, "num_train_timesteps", None)
    if trained is not None and steps >= trained:
        raise ConfigError(f"steps {steps} is not below the {trained} timesteps the model was trained with: "
                          f"use at most {trained - 1}")


def ddim_scheduler(scheduler_config) -> "object":
    """A DDIMScheduler with the training schedule (betas, prediction type) of the pipeline's scheduler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config)
