"""The base model as trainers use it: a frozen pipeline on the right device, prompt encoding, the noise loss."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from loraforge.errors import TrainingError
from loraforge.registry.registry import Registry


@dataclass
class TrainingModel:
    """A loaded base: the pipeline (frozen), its identity, and the precision the run computes in."""

    pipe: object
    base: object  # loraforge.models.base.BaseModel
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    noise_scheduler: object

    @property
    def unet(self):
        return self.pipe.unet

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def precision(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16/fp16 on CUDA as asked (auto = bf16 when supported), always fp32 on CPU."""
    if device.type != "cuda" or mixed_precision == "no":
        return None
    if mixed_precision == "fp16":
        return torch.float16
    if mixed_precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def load_training_model(registry: Registry, base_ref: str, mixed_precision: str = "auto",
                        gradient_checkpointing: bool = False, device: str | None = None) -> TrainingModel:
    """Resolve `base_ref`, load it frozen on CUDA when available (else CPU), with SDPA attention."""
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    from loraforge.models.pipeline import load_pipeline, pick_device
    from loraforge.registry.resolve import resolve_base

    base = resolve_base(registry, base_ref)
    if base.family != "sd1":
        raise TrainingError(f"training on {base.family} bases ({base_ref}) is not supported yet; use an SD1 base")
    dev = pick_device(device)
    amp = precision(mixed_precision, dev)
    # Frozen weights are stored in the autocast dtype on CUDA (half the memory); LoRA weights stay fp32.
    pipe = load_pipeline(base, dev, amp or torch.float32, home=registry.home)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
        part.eval()
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return TrainingModel(pipe=pipe, base=base, device=dev, autocast_dtype=amp, noise_scheduler=noise_scheduler)


def tokenize_prompts(model: TrainingModel, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (batch × 77) exactly as the text encoder receives them."""
    tok = model.pipe.tokenizer(list(prompts), padding="max_length", max_length=model.pipe.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
    return tok.input_ids


def encode_prompts(model: TrainingModel, prompts: Sequence[str], grad: bool = False) -> torch.Tensor:
    """Per-token text embeddings (batch × 77 × dim) from the text encoder."""
    ids = tokenize_prompts(model, prompts)
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx, model.autocast():
        out = model.pipe.text_encoder(ids.to(model.device))[0]
    return out.float()


@torch.no_grad()
def encode_images(model: TrainingModel, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latents (the distribution's mean, so cached and fresh latents agree)."""
    vae = model.pipe.vae
    with model.autocast():
        latents = vae.encode(pixels.to(model.device, vae.dtype)).latent_dist.mean
    return latents.float() * vae.config.scaling_factor


def noise_target(model: TrainingModel, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet must predict under the scheduler's prediction_type."""
    kind = model.noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return model.noise_scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(f"prediction_type {kind!r} of the base's scheduler is not supported")


def sample_noise(latents: torch.Tensor, generator: torch.Generator, num_timesteps: int,
                 t_range: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) drawn on CPU from `generator`, so runs are reproducible on any device."""
    lo, hi = t_range or (0, num_timesteps)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(lo, hi, (latents.shape[0],), generator=generator)
    return noise.to(latents.device), timesteps.to(latents.device)


def denoising_loss(model: TrainingModel, unet, latents: torch.Tensor, text: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """DDPM noise-prediction loss ‖unet(x_t, t, c) − target‖² (per sample when reduce is False)."""
    noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise_target(model, latents, noise, timesteps)
    with model.autocast():
        pred = unet(noisy, timesteps, encoder_hidden_states=text).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss.mean() if reduce else loss
