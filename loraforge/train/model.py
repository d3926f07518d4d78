"""The base model as trainers use it: a frozen pipeline on the right device, prompt encoding, the noise loss."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence, Union

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

    @property
    def family(self) -> str:
        return self.base.family

    @property
    def text_encoders(self) -> list:
        """The text encoders prompts go through: one for SD1, two for SDXL."""
        return [m for m in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)) if m is not None]

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


def check_family(base, families: Sequence[str], method: str):
    """`base` (a models.base.BaseModel), refused in one line when `method` cannot train its family."""
    if base.family not in families:
        raise TrainingError(f"{method} does not train on {base.family} bases ({base.ref}); "
                            f"use a {' or '.join(families)} base")
    return base


def load_training_model(registry: Registry, base_ref: str, mixed_precision: str = "auto",
                        gradient_checkpointing: bool = False, device: str | None = None, *,
                        config: str | None = None, families: Sequence[str] = ("sd1", "sdxl"),
                        method: str = "this trainer") -> TrainingModel:
    """Resolve `base_ref`, load it frozen on CUDA when available (else CPU), with SDPA attention.

    `config` is the diffusers folder whose configs a single-file base is read with (models.base.with_config);
    a base whose family is not in `families` (the ones `method` conditions correctly) is refused.
    """
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    from loraforge.models.base_config import with_config
    from loraforge.models.pipeline import load_pipeline, pick_device
    from loraforge.registry.resolve import resolve_base

    base = check_family(with_config(resolve_base(registry, base_ref), config), families, method)
    dev = pick_device(device)
    amp = precision(mixed_precision, dev)
    # Frozen weights are stored in the autocast dtype on CUDA (half the memory); LoRA weights stay fp32.
    pipe = load_pipeline(base, dev, amp or torch.float32, home=registry.home)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if part is None:
            continue
        part.requires_grad_(False)
        part.eval()
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return TrainingModel(pipe=pipe, base=base, device=dev, autocast_dtype=amp, noise_scheduler=noise_scheduler)


@dataclass
class SDXLText:
    """What SDXL's UNet is conditioned on by a prompt: the per-token embeddings (both encoders' penultimate
    hidden states, concatenated) and text_encoder_2's pooled projection (its `text_embeds`)."""

    embeds: torch.Tensor  # batch × 77 × (dim_1 + dim_2)
    pooled: torch.Tensor  # batch × projection_dim

    def to(self, device) -> "SDXLText":
        return SDXLText(self.embeds.to(device), self.pooled.to(device))

    def __getitem__(self, index) -> "SDXLText":
        return SDXLText(self.embeds[index], self.pooled[index])

    def __len__(self) -> int:
        return self.embeds.shape[0]


# An SD1 prompt is one tensor (batch × 77 × dim); an SDXL prompt an SDXLText.
Text = Union[torch.Tensor, SDXLText]


def tokenize_prompts(model: TrainingModel, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (batch × 77) exactly as the (first) text encoder receives them."""
    return tokenize_all(model, prompts)[0]


def tokenize_all(model: TrainingModel, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Token ids (batch × 77) of each tokenizer of the model, in text-encoder order (SDXL has two)."""
    tokenizers = [t for t in (model.pipe.tokenizer, getattr(model.pipe, "tokenizer_2", None)) if t is not None]
    return [t(list(prompts), padding="max_length", max_length=t.model_max_length, truncation=True,
              return_tensors="pt").input_ids for t in tokenizers]


def encode_prompts(model: TrainingModel, prompts: Sequence[str], grad: bool = False) -> Text:
    """The text conditioning of `prompts`: SD1's per-token embeddings (batch × 77 × dim), or for SDXL an
    SDXLText computed by diffusers' own StableDiffusionXLPipeline.encode_prompt, so a run conditions exactly
    as inference does. `grad` keeps the graph (a text-encoder LoRA is training)."""
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    if model.family == "sdxl":
        with ctx, model.autocast():
            embeds, _, pooled, _ = model.pipe.encode_prompt(list(prompts), device=model.device,
                                                            do_classifier_free_guidance=False)
        return SDXLText(embeds.float(), pooled.float())
    ids = tokenize_prompts(model, prompts)
    with ctx, model.autocast():
        out = model.pipe.text_encoder(ids.to(model.device))[0]
    return out.float()


def cat_text(parts: Sequence[Text]) -> Text:
    """Batches of text conditioning joined along the batch dimension."""
    if parts and isinstance(parts[0], SDXLText):
        return SDXLText(torch.cat([p.embeds for p in parts]), torch.cat([p.pooled for p in parts]))
    return torch.cat(list(parts))


def unet_conditioning(model: TrainingModel, text: Text, latents: torch.Tensor) -> dict:
    """The keyword arguments the UNet takes for `text` on `latents`: encoder_hidden_states, and for SDXL the
    added_cond_kwargs (pooled text_embeds and the micro-conditioning time_ids: original size = target size =
    the latents' pixel size, crop (0, 0), as the SDXL pipeline uses by default), made by the pipeline's own
    _get_add_time_ids."""
    if not isinstance(text, SDXLText):
        return {"encoder_hidden_states": text}
    pipe = model.pipe
    size = (latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=text.embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    time_ids = time_ids.to(latents.device).repeat(latents.shape[0], 1)
    return {"encoder_hidden_states": text.embeds,
            "added_cond_kwargs": {"text_embeds": text.pooled, "time_ids": time_ids}}


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


def denoising_loss(model: TrainingModel, unet, latents: torch.Tensor, text: Text,
                   noise: torch.Tensor, timesteps: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """DDPM noise-prediction loss ‖unet(x_t, t, c) − target‖² (per sample when reduce is False)."""
    noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise_target(model, latents, noise, timesteps)
    with model.autocast():
        pred = unet(noisy, timesteps, **unet_conditioning(model, text, noisy)).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss.mean() if reduce else loss
