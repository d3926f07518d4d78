"""Joint training: several named LoRA adapters on one UNet, one run, each on its own data and loss weight
(e.g. one adapter per view of a visual illusion). Every adapter is registered as its own artifact."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraforge.plugins import TRAINERS
from loraforge.registry.manifest import Manifest
from loraforge.registry.refs import check_name
from loraforge.train.base import TrainConfig
from loraforge.train.lora_targets import TEXT_ENCODER_TARGETS
from loraforge.train.trainer import SessionTrainer
from loraforge.train.trainers.lora import lora_targets, text_encoder_components

if TYPE_CHECKING:  # pragma: no cover
    from loraforge.train.session import Session


class JointAdapter(BaseModel):
    """One adapter of a joint run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = Field(description="Folder or registry dataset this adapter trains on.")
    instance_prompt: Optional[str] = Field(None, description="Caption for this dataset's images that have none.")
    loss_weight: float = Field(1.0, ge=0, description="Weight of this adapter's loss in the joint objective.")
    name: Optional[str] = Field(None, description="Artifact name (default: <output>-<adapter>).")


class JointConfig(TrainConfig):
    adapters: dict[str, JointAdapter] = Field(description='Adapters by name, as JSON: {"view1": {"dataset": "./a", "loss_weight": 1.0}, ...}.')
    crop: Literal["center", "random"] = Field("center", description="How images are cropped to the square resolution.")

    @model_validator(mode="after")
    def _names(self) -> "JointConfig":
        if not self.adapters:
            raise ValueError("a joint run needs at least one adapter")
        for key in self.adapters:
            if not key.replace("_", "").isalnum():
                raise ValueError(f"adapter name {key!r} must be letters, digits and '_'")
        return self


@TRAINERS.register("joint", reference_url="https://huggingface.co/docs/peft/developer_guides/mixed_models", version="1")
class JointTrainer(SessionTrainer):
    """Several named LoRA adapters trained jointly on one UNet, each on its own data."""

    config_class = JointConfig
    method = "joint"
    families = ("sd1", "sdxl")

    def run(self, session: Session) -> list[Manifest]:
        from loraforge.models.peft_layers import activate_adapter
        from loraforge.train.cache import BatchSource
        from loraforge.train.data import batch_indices, prepare_dataset, step_generator
        from loraforge.train.loop import run_loop
        from loraforge.train.model import denoising_loss, encode_prompts, sample_noise
        from loraforge.train.session import AdapterOutput

        config, registry, output = session.config, session.registry, session.output
        keys = sorted(config.adapters)
        names = {k: config.adapters[k].name or f"{output}-{k}" for k in keys}
        for name in names.values():
            check_name(name)
        session.check_lora_targets(lora_targets(session))
        data = {k: prepare_dataset(registry, config.adapters[k].dataset, output=names[k],
                                   instance_prompt=config.adapters[k].instance_prompt) for k in keys}
        model = session.load_model()
        text_parts = text_encoder_components(session)  # none, text_encoder, or (SDXL) both
        encoders = [getattr(model.pipe, c) for c in text_parts]
        sources = {k: BatchSource(model, data[k], home=registry.home, resolution=config.resolution, crop=config.crop,
                                  seed=config.seed, cached=config.cache_latents,
                                  encode_text=not config.train_text_encoder) for k in keys}
        params = {}
        for i, k in enumerate(keys):
            params.update(session.add_lora(model.unet, "unet", config.target_modules, adapter_name=k,
                                           seed=config.seed + i))
            for j, component in enumerate(text_parts, start=1):  # each adapter gets its own text-encoder LoRAs too
                params.update(session.add_lora(getattr(model.pipe, component), component, TEXT_ENCODER_TARGETS,
                                               adapter_name=k, seed=config.seed + j * len(keys) + i))
        unet = session.forward_denoiser()
        session.periodic = [(k, list(dict.fromkeys(data[k].captions))[:2], (0.0, 1.0)) for k in keys]
        n_timesteps = model.noise_scheduler.config.num_train_timesteps

        def step_fn(step: int, micro: int):
            total = 0.0
            for i, k in enumerate(keys):
                for part in (model.unet, *encoders):  # only this adapter acts on (and gets gradients from) its batch
                    activate_adapter(part, k)
                idx = batch_indices(len(data[k]), config.batch_size, step, micro, config.seed + i,
                                    config.gradient_accumulation)
                latents, text = sources[k].batch(idx)
                if text is None:
                    text = encode_prompts(model, sources[k].prompts(idx), grad=True)
                noise, t = sample_noise(latents, step_generator(config.seed, step, micro, stream=i), n_timesteps)
                total = total + config.adapters[k].loss_weight * denoising_loss(model, unet, latents, text, noise, t)
            return total

        result = run_loop(title=f"train joint {output}", params=params, step_fn=step_fn,
                          samples_per_step=config.batch_size * len(keys), **session.loop_kwargs())
        outputs = [AdapterOutput(name=names[k], state=_adapter_state(model, k, text_parts), adapter_name=k,
                                 datasets=[data[k].manifest], validation_prompts=list(dict.fromkeys(data[k].captions))[:2],
                                 metrics={"adapter": k, "loss_weight": config.adapters[k].loss_weight})
                   for k in keys]
        return session.finish(outputs, result.metrics, training={"adapters": keys})


def _adapter_state(model, adapter_name: str, text_parts: list[str]):
    """Adapter `adapter_name`'s factors: its UNet layers, and its layers in the text encoders `text_parts`."""
    from loraforge.train.peft_lora import lora_state_from_module

    state = lora_state_from_module(model.unet, "unet", adapter_name=adapter_name)
    for component in text_parts:
        lora_state_from_module(getattr(model.pipe, component), component, adapter_name=adapter_name, state=state)
    return state
