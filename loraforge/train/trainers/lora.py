"""Text-to-image LoRA on an image + caption dataset (the diffusers train_text_to_image_lora recipe)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field

from loraforge.plugins import TRAINERS
from loraforge.registry.manifest import Manifest
from loraforge.train.base import TrainConfig
from loraforge.train.flow_matching import FlowOptions
from loraforge.train.lora_targets import TEXT_ENCODER_TARGETS_OF_KIND, default_denoiser_targets
from loraforge.train.trainer import SessionTrainer

if TYPE_CHECKING:  # pragma: no cover
    from loraforge.train.cache import BatchSource
    from loraforge.train.data import TrainingSet
    from loraforge.train.session import Session


class LoraConfig(FlowOptions, TrainConfig):
    dataset: str = Field(description="Folder of images with .txt captions or metadata.jsonl, or a registry dataset reference.")
    instance_prompt: Optional[str] = Field(None, description="Caption for images that have none.")
    crop: Literal["center", "random"] = Field("center", description="How images are cropped to the square resolution.")


@TRAINERS.register("lora", reference_url="https://arxiv.org/abs/2106.09685", version="1")
class LoraTrainer(SessionTrainer):
    """Text-to-image LoRA on an image + caption dataset."""

    config_class = LoraConfig
    method = "lora"
    # The SDXL conditioning (two encoders, pooled text, time ids) is train.model's, Flux's flow-matching objective
    # train.flow_matching's.
    families = ("sd1", "sdxl", "flux")
    supports_processes = True  # denoising_step takes each rank's slice of the global batch

    def run(self, session: Session) -> list[Manifest]:
        from loraforge.families import family
        from loraforge.train.data import prepare_dataset
        from loraforge.train.loop import run_loop
        from loraforge.train.peft_lora import lora_state_from_module
        from loraforge.train.session import AdapterOutput

        config, registry, output = session.config, session.registry, session.output
        session.check_lora_targets(lora_targets(session))
        with session.ranks.main_first():  # rank 0 snapshots (registers) the data; the others find it
            data = prepare_dataset(registry, config.dataset, output=output, instance_prompt=config.instance_prompt)
            prior = self.prior_data(session)  # DreamBooth's class images, if any
        datasets = [data.manifest]
        if prior is not None:
            datasets.append(prior.manifest)
        model = session.load_model()
        sources = [self._source(session, d) for d in [data] + ([prior] if prior else [])]
        params = add_lora(session)
        session.periodic = [("default", list(dict.fromkeys(data.captions))[:2], (0.0, 1.0))]
        step_fn = self.denoising_step(session, sources)
        result = run_loop(title=f"train {self.method} {output}", params=params, step_fn=step_fn,
                          samples_per_step=config.batch_size * len(sources), **session.loop_kwargs())
        state = lora_state_from_module(model.denoiser, family(model.family).denoiser)
        for component in text_encoder_components(session):
            lora_state_from_module(getattr(model.pipe, component), component, state=state)
        prompts = list(dict.fromkeys(data.captions))[:2]
        out = AdapterOutput(name=output, state=state, datasets=datasets, validation_prompts=prompts)
        return session.finish([out], result.metrics)

    def denoising_step(self, session: Session, sources: list[BatchSource]):
        """`step_fn(step, micro)` of the loop: the denoising loss on each source's seeded batch (the instance
        images, then DreamBooth's class images at `prior_weight`), summed. On several processes each rank takes
        its slice of the same global batch, its noise and timesteps included, so the ranks together see exactly
        the samples one process sees."""
        from loraforge.train.data import batch_indices, step_generator
        from loraforge.train.model import denoising_loss, encode_prompts, sample_training_noise

        config, model, unet = session.config, session.model, session.forward_denoiser()
        options = config if model.flow else None  # a Flux run's flow-matching options (FlowOptions fields)
        mine = session.ranks.shard(config.batch_size)

        def step_fn(step: int, micro: int):
            total = 0.0
            for k, source in enumerate(sources):
                idx = batch_indices(len(source.data), config.batch_size, step, micro, config.seed + k,
                                    config.gradient_accumulation)[mine]
                latents, text = source.batch(idx)
                if text is None:
                    text = encode_prompts(model, source.prompts(idx), grad=True)
                whole = latents[:1].expand(config.batch_size, *latents.shape[1:])  # the global batch's shape
                noise, t = sample_training_noise(model, whole, step_generator(config.seed, step, micro, stream=k),
                                                 options)
                noise, t = noise[mine], t[mine]
                weight = 1.0 if k == 0 else self.prior_weight(config)
                total = total + weight * denoising_loss(model, unet, latents, text, noise, t, options=options)
            return total

        return step_fn

    def _source(self, session: Session, data: TrainingSet) -> BatchSource:
        from loraforge.train.cache import BatchSource

        c = session.config
        return BatchSource(session.model, data, home=session.registry.home, resolution=c.resolution, crop=c.crop,
                           seed=c.seed, cached=c.cache_latents, encode_text=not c.train_text_encoder)

    def prior_data(self, session: Session) -> TrainingSet | None:
        """A second dataset trained alongside the first (DreamBooth's prior preservation); none here."""
        return None

    def prior_weight(self, config) -> float:
        return 1.0


def text_encoder_components(session: Session) -> list[str]:
    """The text encoders a run trains a LoRA on: none, or with train_text_encoder the base's CLIP encoders
    (text_encoder; SDXL also text_encoder_2). Flux's T5 stays frozen, as in diffusers' Flux LoRA example, whose
    pipelines load text-encoder LoRAs on CLIP only."""
    from loraforge.families import family

    if not session.config.train_text_encoder:
        return []
    fam = family(session.base().family)
    return [c for c, kind in zip(fam.text_encoders, fam.text_encoder_kinds) if kind != "t5"]


def denoiser_targets(session: Session) -> list[str]:
    """The denoiser modules the run targets: the ones the config names, or when it names none, the family's
    default (Flux: the joint attention's image and text projections). A list given explicitly is used as given,
    even when it equals SD's default."""
    c = session.config
    if "target_modules" not in c.model_fields_set:
        return list(default_denoiser_targets(session.base().family))
    return list(c.target_modules)


def _text_targets(session: Session, component: str) -> tuple[str, ...]:
    from loraforge.families import family

    fam = family(session.base().family)
    return TEXT_ENCODER_TARGETS_OF_KIND[fam.text_encoder_kinds[fam.text_encoders.index(component)]]


def lora_targets(session: Session) -> dict:
    """The modules a LoRA run targets, per component (the text encoders' only with train_text_encoder)."""
    from loraforge.families import family

    targets: dict = {family(session.base().family).denoiser: denoiser_targets(session)}
    for component in text_encoder_components(session):
        targets[component] = list(_text_targets(session, component))
    return targets


def add_lora(session: Session) -> dict:
    """Inject the configured LoRA into the denoiser (and text encoders); trainable parameters by name."""
    from loraforge.families import family

    c, model = session.config, session.model
    params = session.add_lora(model.denoiser, family(model.family).denoiser, denoiser_targets(session), seed=c.seed)
    for k, component in enumerate(text_encoder_components(session), start=1):
        params.update(session.add_lora(getattr(model.pipe, component), component, _text_targets(session, component),
                                       seed=c.seed + k))
    return params
