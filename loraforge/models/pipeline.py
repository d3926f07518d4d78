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

from loraforge.families import ADAPTER_COMPONENTS as LORA_COMPONENTS, family


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


def _pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, family(name).pipeline_class)


def load_pipeline(
    base: BaseModel,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    config: str | Path | None = None,
    home: Path | None = None,
):
    """The diffusers pipeline of `base`'s family (StableDiffusion(XL)Pipeline, FluxPipeline) on `device` in
    `dtype`, with progress bars off.

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
    if base.family == "flux":
        # a BFL file is the transformer alone: the rest of the pipeline is the --config folder's own
        from loraforge.models.flux_single_file import load_transformer

        return cls.from_pretrained(config, transformer=load_transformer(base.path, config, dtype), dtype=dtype)
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
    """For the denoiser (unet / transformer) and text encoders: module path -> weight shape of every Linear and Conv2d, and with
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
    kwargs = call_kwargs(pipe, guidance=guidance, height=height, width=width, negative_prompt=negative_prompt,
                         attention_kwargs=cross_attention_kwargs)
    result = pipe(prompt, num_inference_steps=steps, generator=generator, output_type="pil", **kwargs)
    return result.images[0]


def pipeline_family(pipe) -> str:
    """The family name of a loaded pipeline, from its components."""
    from loraforge.families import family_of_components

    found = family_of_components(name for name in ("unet", "transformer", "text_encoder_2")
                                 if getattr(pipe, name, None) is not None)
    if found is None:
        raise ConfigError(f"{type(pipe).__name__} has neither a UNet nor a transformer; it is no pipeline loraforge knows")
    return found.name


def default_size(pipe) -> int | None:
    """The image size a pipeline draws when none is given: None (the pipeline's own) for SD; for Flux, diffusers'
    1024 px, or the builtin test model's 64 px for a transformer as narrow as it."""
    if pipeline_family(pipe) != "flux":
        return None
    from loraforge.models.builtin.flux import DEFAULT_SIZE, HEAD_DIM, HEADS

    config = pipe.transformer.config
    return DEFAULT_SIZE if config.num_attention_heads * config.attention_head_dim <= HEADS * HEAD_DIM else 1024


def call_kwargs(pipe, *, guidance: float, height: int | None, width: int | None, negative_prompt=None,
                attention_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments a text-to-image call of `pipe`'s family takes for these settings: SD pipelines take a
    negative prompt and `cross_attention_kwargs`; Flux takes its embedded guidance, `joint_attention_kwargs`, the
    T5 length its tokenizer reads, and refuses a negative prompt (its guidance is distilled: there is no
    unconditional pass for one to steer) in one line."""
    if pipeline_family(pipe) != "flux":
        return {"guidance_scale": guidance, "height": height, "width": width, "negative_prompt": negative_prompt,
                "cross_attention_kwargs": attention_kwargs}
    if negative_prompt and any(negative_prompt if isinstance(negative_prompt, list) else [negative_prompt]):
        raise ConfigError("Flux bases take no negative prompt (FLUX.1's guidance is distilled into the model, so "
                          "there is no unconditional pass to steer): drop the negative prompt")
    size = default_size(pipe)
    return {"guidance_scale": guidance, "height": height or size, "width": width or size,
            "joint_attention_kwargs": attention_kwargs,
            "max_sequence_length": t5_length(pipe)}


def t5_length(pipe) -> int:
    """How many T5 tokens a Flux pipeline's prompts are encoded to: its tokenizer's length, at most FluxPipeline's 512."""
    return min(512, int(pipe.tokenizer_2.model_max_length))


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
