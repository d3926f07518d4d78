"""The rectified-flow objective Flux trains with, as diffusers' Flux LoRA example computes it.

Latents are packed into 2×2 patch tokens; a sample's noise level σ is drawn from a density over [0, 1]
(logit-normal by default) and looked up in the FlowMatchEuler training schedule; the transformer sees
x_σ = (1 − σ)·x + σ·ε at timestep σ with the embedded guidance and predicts the velocity ε − x; the squared
error is weighted per σ. Everything random comes from the caller's CPU generator, so resumed runs repeat it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Sequence

from pydantic import BaseModel, Field

if TYPE_CHECKING:  # pragma: no cover
    import torch

# `model` arguments are train.model.TrainingModel and `text` ones train.model.PooledText (that module calls this one).

WeightingScheme = Literal["logit_normal", "none", "mode", "sigma_sqrt", "cosmap"]


class EmbeddedGuidance(BaseModel):
    """The guidance a Flux transformer's guidance embedding is given while training (a slider's only flow option)."""

    embedded_guidance: float = Field(1.0, ge=0, description="Flux: the guidance value the transformer's guidance "
                                                            "embedding is given while training (FLUX.1-dev).")


class FlowOptions(EmbeddedGuidance):
    """Options of the flow-matching objective (Flux bases); a base trained to predict noise refuses changed ones."""

    weighting_scheme: WeightingScheme = Field(
        "logit_normal", description="Flux: how noise levels are drawn and weighted (logit_normal and mode draw σ from "
                                    "that density; none, sigma_sqrt and cosmap draw it uniformly, the last two weight "
                                    "the loss by σ).")
    logit_mean: float = Field(0.0, description="Flux: mean of the logit-normal noise-level density.")
    logit_std: float = Field(1.0, gt=0, description="Flux: standard deviation of the logit-normal noise-level density.")
    mode_scale: float = Field(1.29, description="Flux: scale of the mode noise-level density.")


FLOW_FIELDS = tuple(FlowOptions.model_fields)


def check_flow_options(config, base) -> None:
    """Refuse flow-matching options given for a base that is not trained as a flow, naming them (even at their
    default values: an option is honoured or refused, never ignored)."""
    from loraforge.errors import ConfigError
    from loraforge.families import family

    if family(base.family).prediction == "flow":
        return
    given = [f"{n}={getattr(config, n)!r}" for n in FLOW_FIELDS if n in getattr(config, "model_fields_set", ())]
    if given:
        raise ConfigError(f"{', '.join(given)}: flow-matching options of Flux bases, but {base.ref} is a "
                          f"{family(base.family).label} base trained to predict noise; drop them")


def pack(latents: "torch.Tensor") -> "torch.Tensor":
    """batch × C × H × W latents as batch × (H/2·W/2) × 4C tokens, the layout diffusers' FluxPipeline uses."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: "torch.Tensor", height: int, width: int) -> "torch.Tensor":
    """The inverse of `pack`: batch × tokens × 4C back to batch × C × height × width latents."""
    b, _, c4 = tokens.shape
    grid = tokens.reshape(b, height // 2, width // 2, c4 // 4, 2, 2)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, height, width)


def image_ids(tokens: "torch.Tensor", height: int, width: int) -> "torch.Tensor":
    """The rotary position ids of the packed tokens of a height × width latent."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(tokens.shape[0], height // 2, width // 2, tokens.device,
                                                  tokens.dtype)


def training_scheduler(scheduler_config):
    """The FlowMatchEuler schedule at training time: the σ table noise levels are drawn from."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)


def sample_noise(scheduler, latents: "torch.Tensor", generator: "torch.Generator",
                 options: FlowOptions) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(noise, σ) for `latents`, drawn on CPU from `generator`: u from diffusers' timestep density, the index
    ⌊u·N⌋ of the scheduler's training timesteps, σ the timestep's sigma."""
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    noise = torch.randn(latents.shape, generator=generator)
    u = compute_density_for_timestep_sampling(options.weighting_scheme, latents.shape[0], logit_mean=options.logit_mean,
                                              logit_std=options.logit_std, mode_scale=options.mode_scale,
                                              generator=generator)
    n = scheduler.config.num_train_timesteps
    indices = (u * n).long().clamp(0, n - 1)
    sigmas = scheduler.sigmas[indices].float()
    return noise.to(latents.device), sigmas.to(latents.device)


def conditioning(model, text, tokens: "torch.Tensor", height: int, width: int,
                 guidance: float) -> dict:
    """The transformer's keyword arguments besides the tokens and timestep: T5 sequence, CLIP pooled vector, the
    text and image position ids, and the guidance embedding's value when the transformer has one."""
    import torch

    transformer = model.denoiser
    kwargs = {"encoder_hidden_states": text.embeds, "pooled_projections": text.pooled,
              "txt_ids": torch.zeros(text.embeds.shape[1], 3, device=tokens.device, dtype=tokens.dtype),
              "img_ids": image_ids(tokens, height, width)}
    if transformer.config.guidance_embeds:
        kwargs["guidance"] = torch.full((tokens.shape[0],), float(guidance), device=tokens.device)
    return kwargs


def predict_velocity(model, transformer, tokens: "torch.Tensor", sigmas: "torch.Tensor",
                     text, height: int, width: int, guidance: float) -> "torch.Tensor":
    """The transformer's velocity for the packed `tokens` of a height × width latent at noise levels `sigmas` (its
    timestep input is σ, diffusers' t/1000)."""
    with model.autocast():
        out = transformer(hidden_states=tokens, timestep=sigmas.to(tokens.dtype),
                          **conditioning(model, text, tokens, height, width, guidance), return_dict=False)[0]
    return out.float()


def flow_loss(model, transformer, latents: "torch.Tensor", text, noise: "torch.Tensor",
              sigmas: "torch.Tensor", options: FlowOptions, reduce: bool = True) -> "torch.Tensor":
    """Weighted ‖v_θ(x_σ, σ, c) − (ε − x)‖² on packed tokens (per sample when reduce is False)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    target = pack(noise - latents)
    pred = predict_velocity(model, transformer, pack(noisy), sigmas, text, *latents.shape[-2:],
                            options.embedded_guidance)
    weighting = compute_loss_weighting_for_sd3(options.weighting_scheme, sigmas).view(-1, 1, 1).float()
    loss = (weighting * (pred - target.float()) ** 2).mean(dim=(1, 2))
    return loss.mean() if reduce else loss


def encode_prompts(model, prompts: Sequence[str]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(T5 sequence, CLIP pooled vector) of `prompts`, by diffusers' own FluxPipeline.encode_prompt (the T5
    length its tokenizer reads, as inference uses)."""
    from loraforge.models.pipeline import t5_length

    pipe = model.pipe
    with model.autocast():
        embeds, pooled, _text_ids = pipe.encode_prompt(list(prompts), device=model.device,
                                                       max_sequence_length=t5_length(pipe))
    return embeds.float(), pooled.float()


def sampling_schedule(model, steps: int, side: int):
    """A FlowMatchEuler sampler set to `steps` steps as FluxPipeline sets it for a `side`×`side` latent (σ from 1
    to 1/steps, shifted by the image's token count when the schedule shifts dynamically)."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sampler = training_scheduler(model.pipe.scheduler.config)
    cfg = sampler.config
    mu = None
    if cfg.use_dynamic_shifting:
        mu = calculate_shift((side // 2) ** 2, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                             cfg.max_shift)
    sampler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sampler
