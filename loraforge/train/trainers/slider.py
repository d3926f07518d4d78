"""Concept Sliders: a LoRA whose scale moves one attribute — text sliders and image-pair sliders."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field, model_validator

from loraforge.plugins import TRAINERS
from loraforge.registry.manifest import Manifest, SliderInfo
from loraforge.train.base import TrainConfig
from loraforge.train.lora_targets import LAYER_PRESETS
from loraforge.train.trainer import SessionTrainer

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from loraforge.registry.registry import Registry
    from loraforge.train.data import TrainingSet
    from loraforge.train.session import Session


class SliderConfig(TrainConfig):
    concept: Optional[str] = Field(None, description="What the slider moves, e.g. 'age' (recorded in the manifest).")
    target: str = Field("", description="Target prompt c_t whose images the slider edits, e.g. 'a person'.")
    positive: Optional[str] = Field(None, description="Prompt of the + direction, e.g. 'an old person' (text sliders).")
    negative: Optional[str] = Field(None, description="Prompt of the − direction, e.g. 'a young person' (text sliders).")
    neutral: Optional[str] = Field(None, description="Anchor prompt c_n (default: the target prompt).")
    guidance: float = Field(2.0, gt=0, description="Guidance η: how far one unit of scale moves along ε(c+) − ε(c−).")
    preservation: list[str] = Field(default_factory=list, description="Attribute words prepended to every prompt so the slider does not move them, e.g. male, female.")
    layers: Literal["noxattn", "xattn", "full", "custom"] = Field("noxattn", description="Targeted layers: noxattn = all but cross-attention, xattn = cross-attention only, full = attention, FF and ResNet convs, custom = the --target-modules list.")
    denoise_steps: int = Field(10, ge=2, description="Schedule length used to sample the intermediate x_t with the slider on.")
    low_images: Optional[str] = Field(None, description="Image-pair slider: folder (or dataset) of 'low' images (scale −1).")
    high_images: Optional[str] = Field(None, description="Image-pair slider: folder (or dataset) of 'high' images with the same file names (scale +1).")
    scale_range: tuple[float, float] = Field((-2.0, 2.0), description="Recommended scale range written into the manifest.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    rank: int = Field(4, ge=1, description="LoRA rank r.")
    alpha: Optional[float] = Field(1.0, gt=0, description="LoRA alpha (scale = alpha / rank).")
    train_text_encoder: bool = Field(False, description="Not supported: a slider trains UNet layers only.")

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

    def run(self, session: Session) -> list[Manifest]:
        from loraforge.models.peft_layers import set_lora_scale
        from loraforge.train.loop import run_loop
        from loraforge.train.peft_lora import lora_state_from_module
        from loraforge.train.session import AdapterOutput

        config, registry, output = session.config, session.registry, session.output
        targets = config.target_modules if config.layers == "custom" else LAYER_PRESETS[config.layers]
        session.check_lora_targets({"unet": targets})
        pairs = _pair_sets(registry, config, output) if config.mode == "image_pair" else None
        model = session.load_model()
        params = session.add_lora(model.unet, "unet", targets, seed=config.seed)
        unet = session.forward_unet()
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
        set_lora_scale(model.unet, 1.0)
        info = SliderInfo(concept=config.concept, method=config.mode, positive=config.positive or config.high_images,
                          negative=config.negative or config.low_images, neutral=config.neutral or config.target,
                          target=config.target, scale_range=config.scale_range)
        out = AdapterOutput(name=output, state=lora_state_from_module(model.unet, "unet"), kind="slider", slider=info,
                            datasets=datasets, validation_prompts=prompts, validation_scales=(lo, lo / 2, 0.0, hi / 2, hi))
        return session.finish([out], result.metrics, training={"mode": config.mode, "guidance": config.guidance,
                                                                "layers": config.layers})


def _text_objective(session: Session, unet):
    """loss = ½ Σ_{s=±1} ‖ε_{θ,s}(x_t, c_t) − (ε(x_t, c_n) + s·η·(ε(x_t, c₊) − ε(x_t, c₋)))‖²."""
    import torch
    import torch.nn.functional as F

    from loraforge.models.peft_layers import set_lora_scale
    from loraforge.train.data import step_generator
    from loraforge.train.model import encode_prompts

    c, model = session.config, session.model
    words = [""] + list(c.preservation)
    embeddings: dict[str, torch.Tensor] = {}

    def embed(prompt: str) -> torch.Tensor:
        if prompt not in embeddings:
            embeddings[prompt] = encode_prompts(model, [prompt])
        return embeddings[prompt]

    sampler = type(model.pipe.scheduler).from_config(model.pipe.scheduler.config)
    sampler.set_timesteps(c.denoise_steps)
    latent_size = c.resolution // model.pipe.vae_scale_factor

    def step_fn(step: int, micro: int) -> torch.Tensor:
        g = step_generator(c.seed, step, micro)
        word = words[int(torch.randint(len(words), (1,), generator=g))]
        prompt = {k: f"{word} {p}".strip() for k, p in
                  (("target", c.target), ("positive", c.positive), ("negative", c.negative), ("neutral", c.neutral or c.target))}
        emb = {k: embed(p).expand(c.batch_size, -1, -1) for k, p in prompt.items()}
        x = torch.randn((c.batch_size, 4, latent_size, latent_size), generator=g).to(model.device) * sampler.init_noise_sigma
        stop = int(torch.randint(1, c.denoise_steps, (1,), generator=g))
        with torch.no_grad():
            set_lora_scale(model.unet, 1.0)  # x_t comes from the slider's own trajectory, as in the paper
            for t in sampler.timesteps[:stop]:
                with model.autocast():
                    eps = model.unet(sampler.scale_model_input(x, t), t, encoder_hidden_states=emb["target"]).sample
                x = sampler.step(eps.float(), t, x).prev_sample
            t = sampler.timesteps[stop]
            set_lora_scale(model.unet, 0.0)
            with model.autocast():
                eps_n, eps_p, eps_m = (model.unet(x, t, encoder_hidden_states=emb[k]).sample.float()
                                       for k in ("neutral", "positive", "negative"))
        loss = 0.0
        for sign in (1.0, -1.0):
            set_lora_scale(model.unet, sign)
            target = eps_n + sign * c.guidance * (eps_p - eps_m)
            with model.autocast():
                pred = unet(x, t, encoder_hidden_states=emb["target"]).sample.float()
            loss = loss + 0.5 * F.mse_loss(pred, target)
        set_lora_scale(model.unet, 1.0)
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
    from loraforge.train.model import denoising_loss, sample_noise

    c, model = session.config, session.model
    low, high = (BatchSource(model, d, home=session.registry.home, resolution=c.resolution, seed=c.seed,
                             cached=c.cache_latents) for d in pairs)
    n_timesteps = model.noise_scheduler.config.num_train_timesteps

    def step_fn(step: int, micro: int) -> torch.Tensor:
        idx = batch_indices(len(high.data), c.batch_size, step, micro, c.seed, c.gradient_accumulation)
        lat_lo, text = low.batch(idx)
        lat_hi, _ = high.batch(idx)
        noise, t = sample_noise(lat_hi, step_generator(c.seed, step, micro), n_timesteps)
        loss = 0.0
        for sign, latents in ((1.0, lat_hi), (-1.0, lat_lo)):
            set_lora_scale(model.unet, sign)
            loss = loss + 0.5 * denoising_loss(model, unet, latents, text, noise, t)
        set_lora_scale(model.unet, 1.0)
        return loss

    return step_fn
