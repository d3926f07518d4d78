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
    def denoiser(self):
        """The component that predicts noise or velocity: the UNet, or Flux's transformer."""
        from loraforge.families import family

        return getattr(self.pipe, family(self.family).denoiser)

    @property
    def family(self) -> str:
        return self.base.family

    @property
    def flow(self) -> bool:
        """Whether the base is trained as a rectified flow (velocity prediction), as Flux is."""
        from loraforge.families import family

        return family(self.family).prediction == "flow"

    @property
    def text_encoders(self) -> list:
        """The text encoders prompts go through: one for SD1, two for SDXL and Flux (CLIP and T5)."""
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

    from loraforge.families import family
    from loraforge.models.base_config import with_config
    from loraforge.models.pipeline import load_pipeline, pick_device
    from loraforge.registry.resolve import resolve_base

    base = check_family(with_config(resolve_base(registry, base_ref), config), families, method)
    dev = pick_device(device)
    amp = precision(mixed_precision, dev)
    # Frozen weights are stored in the autocast dtype on CUDA (half the memory); LoRA weights stay fp32.
    pipe = load_pipeline(base, dev, amp or torch.float32, home=registry.home)
    fam = family(base.family)
    for part in (getattr(pipe, name, None) for name in fam.components):
        if part is None:
            continue
        part.requires_grad_(False)
        part.eval()
    denoiser = getattr(pipe, fam.denoiser)
    if not fam.is_transformer:  # Flux's attention processors already call SDPA
        denoiser.set_attn_processor(AttnProcessor2_0())
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if fam.prediction == "flow":
        from loraforge.train.flow_matching import training_scheduler

        noise_scheduler = training_scheduler(pipe.scheduler.config)
    else:
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return TrainingModel(pipe=pipe, base=base, device=dev, autocast_dtype=amp, noise_scheduler=noise_scheduler)


@dataclass
class PooledText:
    """A prompt's per-token embeddings and one pooled vector. SDXL: both encoders' penultimate hidden states,
    concatenated, and text_encoder_2's pooled projection (its `text_embeds`); Flux: T5's sequence and CLIP's
    pooled output."""

    embeds: torch.Tensor  # batch × tokens × width
    pooled: torch.Tensor  # batch × pooled width

    def to(self, device) -> "PooledText":
        return PooledText(self.embeds.to(device), self.pooled.to(device))

    def __getitem__(self, index) -> "PooledText":
        return PooledText(self.embeds[index], self.pooled[index])

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def repeat(self, n: int) -> "PooledText":
        """One prompt's conditioning for a batch of n."""
        return PooledText(self.embeds.expand(n, -1, -1), self.pooled.expand(n, -1))


SDXLText = PooledText  # the name SDXL code knows it by

# An SD1 prompt is one tensor (batch × 77 × dim); an SDXL or Flux prompt a PooledText.
Text = Union[torch.Tensor, PooledText]


def repeat_text(text: Text, n: int) -> Text:
    """A one-prompt conditioning repeated for a batch of n (a view: no copy)."""
    return text.repeat(n) if isinstance(text, PooledText) else text.expand(n, -1, -1)


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
    as inference does (Flux: FluxPipeline.encode_prompt's T5 sequence and CLIP pooled vector). `grad` keeps the
    graph (a text-encoder LoRA is training)."""
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    if model.flow:
        from loraforge.train import flow_matching

        with ctx:
            return PooledText(*flow_matching.encode_prompts(model, prompts))
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
    """Scaled VAE latents (the distribution's mean, so cached and fresh latents agree); a flow model's VAE (Flux)
    is also shifted, (z − shift_factor)·scaling_factor, as its pipeline decodes them."""
    vae = model.pipe.vae
    with model.autocast():
        latents = vae.encode(pixels.to(model.device, vae.dtype)).latent_dist.mean
    if model.flow:
        return (latents.float() - vae.config.shift_factor) * vae.config.scaling_factor
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


def sample_training_noise(model: TrainingModel, latents: torch.Tensor, generator: torch.Generator,
                          options=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) of the base's objective for `latents`: DDPM's uniform integer timesteps, or for a flow
    model (Flux) the noise levels σ drawn as `options` (a flow_matching.FlowOptions) say."""
    if model.flow:
        from loraforge.train import flow_matching

        return flow_matching.sample_noise(model.noise_scheduler, latents, generator, options)
    return sample_noise(latents, generator, model.noise_scheduler.config.num_train_timesteps)


def predict(model: TrainingModel, denoiser, x: torch.Tensor, t, text: Text, guidance: float = 1.0) -> torch.Tensor:
    """The denoiser's prediction on latents x (batch × C × H × W) at t, in x's layout: a UNet's ε at timestep t,
    or Flux's velocity at noise level t = σ with embedded guidance `guidance` (x packed into tokens and back)."""
    if model.flow:
        from loraforge.train import flow_matching

        sigmas = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        v = flow_matching.predict_velocity(model, denoiser, flow_matching.pack(x), sigmas, text, *x.shape[-2:], guidance)
        return flow_matching.unpack(v, x.shape[-2], x.shape[-1])
    with model.autocast():
        return denoiser(x, t, **unet_conditioning(model, text, x)).sample.float()


def latent_shape(model: TrainingModel, batch: int, resolution: int) -> tuple[int, ...]:
    """The latents a square image of `resolution` pixels has (Flux: an even side, its tokens being 2×2 patches)."""
    vae = model.pipe.vae
    factor = model.pipe.vae_scale_factor
    side = 2 * (resolution // (factor * 2)) if model.flow else resolution // factor
    return (batch, vae.config.latent_channels, side, side)


def inference_schedule(model: TrainingModel, steps: int, side: int):
    """The base's sampler set to `steps` steps for a `side`×`side` latent, as its pipeline sets it."""
    if model.flow:
        from loraforge.train import flow_matching

        return flow_matching.sampling_schedule(model, steps, side)
    sampler = type(model.pipe.scheduler).from_config(model.pipe.scheduler.config)
    sampler.set_timesteps(steps)
    return sampler


def sampler_input(model: TrainingModel, sampler, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(model input, model time) of sampler timestep t: the scaled input and t itself for a UNet; x and the noise
    level σ = t / num_train_timesteps for a flow transformer (as FluxPipeline passes timestep / 1000)."""
    if model.flow:
        return x, t / sampler.config.num_train_timesteps
    return sampler.scale_model_input(x, t), t


def initial_noise(model: TrainingModel, sampler, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """x_T for the sampler, drawn on CPU from `generator`, on the model's device."""
    scale = getattr(sampler, "init_noise_sigma", None)
    x = torch.randn(shape, generator=generator).to(model.device)
    return x if scale is None else x * scale


def denoising_loss(model: TrainingModel, unet, latents: torch.Tensor, text: Text,
                   noise: torch.Tensor, timesteps: torch.Tensor, reduce: bool = True, options=None) -> torch.Tensor:
    """DDPM noise-prediction loss ‖unet(x_t, t, c) − target‖² (per sample when reduce is False); for a flow
    model (Flux) the velocity loss of flow_matching.flow_loss at noise levels `timesteps` (σ), with `options`."""
    if model.flow:
        from loraforge.train import flow_matching

        return flow_matching.flow_loss(model, unet, latents, text, noise, timesteps, options, reduce=reduce)
    noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise_target(model, latents, noise, timesteps)
    with model.autocast():
        pred = unet(noisy, timesteps, **unet_conditioning(model, text, noisy)).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss.mean() if reduce else loss
