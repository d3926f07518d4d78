"""Concept Sliders: a LoRA whose scale moves one attribute — text sliders and image-pair sliders."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field, model_validator

from loraforge.plugins import TRAINERS
from loraforge.registry.manifest import Manifest, SliderInfo
from loraforge.train.base import TrainConfig
from loraforge.train.flow_matching import EmbeddedGuidance
from loraforge.train.trainer import SessionTrainer

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from loraforge.registry.registry import Registry
    from loraforge.train.data import TrainingSet
    from loraforge.train.session import Session


class SliderConfig(EmbeddedGuidance, TrainConfig):
    concept: Optional[str] = Field(None, description="What the slider moves, e.g. 'age' (recorded in the manifest).")
    target: str = Field("", description="Target prompt c_t whose images the slider edits, e.g. 'a person'.")
    positive: Optional[str] = Field(None, description="Prompt of the + direction, e.g. 'an old person' (text sliders).")
    negative: Optional[str] = Field(None, description="Prompt of the − direction, e.g. 'a young person' (text sliders).")
    neutral: Optional[str] = Field(None, description="Anchor prompt c_n (default: the target prompt).")
    guidance: float = Field(2.0, gt=0, description="Guidance η: how far one unit of scale moves along ε(c+) − ε(c−).")
    preservation: list[str] = Field(default_factory=list, description="Attribute words prepended to every prompt so the slider does not move them, e.g. male, female.")
    layers: Literal["noxattn", "xattn", "full", "custom"] = Field("noxattn", description="Targeted layers: noxattn = all but cross-attention, xattn = cross-attention only, full = attention, FF and ResNet convs, custom = the --target-modules list. Flux: noxattn = the image stream's attention and feed-forwards, full adds the text stream's; xattn is refused (joint attention).")
    denoise_steps: int = Field(10, ge=2, description="Schedule length used to sample the intermediate x_t with the slider on.")
    low_images: Optional[str] = Field(None, description="Image-pair slider: folder (or dataset) of 'low' images (scale −1).")
    high_images: Optional[str] = Field(None, description="Image-pair slider: folder (or dataset) of 'high' images with the same file names (scale +1).")
    scale_range: tuple[float, float] = Field((-2.0, 2.0), description="Recommended scale range written into the manifest.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    rank: int = Field(4, ge=1, description="LoRA rank r.")
    alpha: Optional[float] = Field(1.0, gt=0, description="LoRA alpha (scale = alpha / rank).")
    train_text_encoder: bool = Field(False, description="Not supported: a slider trains denoiser layers only.")

    @model_validator(mode="after")
    def _one_mode(self) -> "SliderConfig":
        if self.train_text_encoder:
            raise ValueError("a slider trains UNet layers only; train_text_encoder is not supported, "
                             "drop --train-text-encoder")
        pairs = self.low_images is not None or self.high_images is not None
        if pairs and (self.low_images is None or self.high_images is None):
            raise ValueError("an image-pair slider needs both low_images and high_images")
        if not pairs and (not self.positive or not self.negative):
            raise ValueError("a text slider needs positive and negative prompts (or give low_images and high_images)")
        return self

    @property
    def mode(self) -> str:
        return "image_pair" if self.low_images else "text"


@TRAINERS.register("slider", reference_url="https://arxiv.org/abs/2311.12092", version="1")
class SliderTrainer(SessionTrainer):
    """Concept Sliders: text sliders and image-pair sliders, trained in both directions."""

    config_class = SliderConfig
    method = "slider"
    families = ("sd1", "flux")  # the objective needs only ε or v predictions (train.model.predict)

    def run(self, session: Session) -> list[Manifest]:
        from loraforge.families import family
        from loraforge.models.peft_layers import set_lora_scale
        from loraforge.train.loop import run_loop
        from loraforge.train.peft_lora import lora_state_from_module
        from loraforge.train.session import AdapterOutput

        config, registry, output = session.config, session.registry, session.output
        base = session.base()
        targets = _targets(config, base)
        component = family(base.family).denoiser
        session.check_lora_targets({component: targets})
        pairs = _pair_sets(registry, config, output) if config.mode == "image_pair" else None
        model = session.load_model()
        params = session.add_lora(model.denoiser, component, targets, seed=config.seed)
        unet = session.forward_denoiser()
        if pairs is None:
            step_fn = _text_objective(session, unet)
            datasets, prompts = [], [config.target or config.neutral or ""]
        else:
            step_fn = _pair_objective(session, unet, pairs)
            datasets, prompts = [pairs[0].manifest, pairs[1].manifest], [pairs[1].captions[0]]
        lo, hi = config.scale_range
        session.periodic = [("default", prompts, (lo, 0.0, hi))]
        result = run_loop(title=f"train slider {output}", params=params, step_fn=step_fn,
                          samples_per_step=config.batch_size, **session.loop_kwargs())
        set_lora_scale(model.denoiser, 1.0)
        info = SliderInfo(concept=config.concept, method=config.mode, positive=config.positive or config.high_images,
                          negative=config.negative or config.low_images, neutral=config.neutral or config.target,
                          target=config.target, scale_range=config.scale_range)
        out = AdapterOutput(name=output, state=lora_state_from_module(model.denoiser, component), kind="slider", slider=info,
                            datasets=datasets, validation_prompts=prompts, validation_scales=(lo, lo / 2, 0.0, hi / 2, hi))
        return session.finish([out], result.metrics, training={"mode": config.mode, "guidance": config.guidance,
                                                                "layers": config.layers})


def _targets(config: SliderConfig, base):
    """The modules the slider trains: the --target-modules list (custom), or the family's layer preset."""
    from loraforge.errors import ConfigError
    from loraforge.families import family
    from loraforge.train.lora_targets import layer_presets

    if config.layers == "custom":
        return config.target_modules
    presets = layer_presets(base.family)
    if config.layers not in presets:
        raise ConfigError(f"layers {config.layers} has no meaning on {family(base.family).label} bases ({base.ref}), "
                          f"whose text and image tokens attend jointly; use {', '.join(presets)} or custom")
    return presets[config.layers]


def _text_objective(session: Session, unet):
    """loss = ½ Σ_{s=±1} ‖ε_{θ,s}(x_t, c_t) − (ε(x_t, c_n) + s·η·(ε(x_t, c₊) − ε(x_t, c₋)))‖², with the velocities
    v of a flow model (Flux) in place of ε, its x_t sampled along its own flow."""
    import torch
    import torch.nn.functional as F

    from loraforge.models.peft_layers import set_lora_scale
    from loraforge.train.data import step_generator
    from loraforge.train.model import (Text, encode_prompts, inference_schedule, initial_noise, latent_shape,
                                       predict, repeat_text, sampler_input)

    c, model = session.config, session.model
    denoiser = model.denoiser
    guidance = c.embedded_guidance
    words = [""] + list(c.preservation)
    embeddings: dict[str, Text] = {}

    def embed(prompt: str) -> Text:
        if prompt not in embeddings:
            embeddings[prompt] = encode_prompts(model, [prompt])
        return embeddings[prompt]

    shape = latent_shape(model, c.batch_size, c.resolution)

    def step_fn(step: int, micro: int) -> torch.Tensor:
        g = step_generator(c.seed, step, micro)
        word = words[int(torch.randint(len(words), (1,), generator=g))]
        prompt = {k: f"{word} {p}".strip() for k, p in
                  (("target", c.target), ("positive", c.positive), ("negative", c.negative), ("neutral", c.neutral or c.target))}
        emb = {k: repeat_text(embed(p), c.batch_size) for k, p in prompt.items()}
        sampler = inference_schedule(model, c.denoise_steps, shape[-1])  # fresh: some samplers count their steps
        x = initial_noise(model, sampler, shape, g)
        stop = int(torch.randint(1, c.denoise_steps, (1,), generator=g))
        with torch.no_grad():
            set_lora_scale(denoiser, 1.0)  # x_t comes from the slider's own trajectory, as in the paper
            for t in sampler.timesteps[:stop]:
                x_in, time = sampler_input(model, sampler, x, t)
                pred = predict(model, denoiser, x_in, time, emb["target"], guidance)
                x = sampler.step(pred, t, x).prev_sample
            x_in, time = x, sampler_input(model, sampler, x, sampler.timesteps[stop])[1]
            set_lora_scale(denoiser, 0.0)
            eps_n, eps_p, eps_m = (predict(model, denoiser, x_in, time, emb[k], guidance)
                                   for k in ("neutral", "positive", "negative"))
        loss = 0.0
        for sign in (1.0, -1.0):
            set_lora_scale(denoiser, sign)
            target = eps_n + sign * c.guidance * (eps_p - eps_m)
            pred = predict(model, unet, x_in, time, emb["target"], guidance)
            loss = loss + 0.5 * F.mse_loss(pred, target)
        set_lora_scale(denoiser, 1.0)
        return loss

    return step_fn


def _pair_sets(registry: Registry, config: SliderConfig, output: str) -> tuple[TrainingSet, TrainingSet]:
    """Low and high datasets whose images pair up by file name."""
    from loraforge.errors import DatasetError
    from loraforge.train.data import prepare_dataset

    prompt = config.target or config.neutral or "a photo"
    low = prepare_dataset(registry, config.low_images, output=f"{output}-low", instance_prompt=prompt)
    high = prepare_dataset(registry, config.high_images, output=f"{output}-high", instance_prompt=prompt)
    if low.images != high.images:
        only = sorted(set(low.images) ^ set(high.images))
        raise DatasetError(f"low and high image folders must hold the same file names; unpaired: {', '.join(only[:5])}")
    return low, high


def _pair_objective(session: Session, unet, pairs: tuple[TrainingSet, TrainingSet]):
    """Shared noise and timestep per pair: at scale +1 denoise the high image, at −1 the low one."""
    from loraforge.models.peft_layers import set_lora_scale
    from loraforge.train.cache import BatchSource
    from loraforge.train.data import batch_indices, step_generator
    from loraforge.train.flow_matching import FlowOptions
    from loraforge.train.model import denoising_loss, sample_training_noise

    c, model = session.config, session.model
    low, high = (BatchSource(model, d, home=session.registry.home, resolution=c.resolution, seed=c.seed,
                             cached=c.cache_latents) for d in pairs)
    # Flux: the default flow objective (logit-normal σ), at the slider's embedded guidance.
    options = FlowOptions(embedded_guidance=c.embedded_guidance) if model.flow else None

    def step_fn(step: int, micro: int) -> torch.Tensor:
        idx = batch_indices(len(high.data), c.batch_size, step, micro, c.seed, c.gradient_accumulation)
        lat_lo, text = low.batch(idx)
        lat_hi, _ = high.batch(idx)
        noise, t = sample_training_noise(model, lat_hi, step_generator(c.seed, step, micro), options)
        loss = 0.0
        for sign, latents in ((1.0, lat_hi), (-1.0, lat_lo)):
            set_lora_scale(model.denoiser, sign)
            loss = loss + 0.5 * denoising_loss(model, unet, latents, text, noise, t, options=options)
        set_lora_scale(model.denoiser, 1.0)
        return loss

    return step_fn
