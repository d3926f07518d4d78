"""Full DreamBooth: the UNet's own weights (and optionally the text encoders') fine-tuned on a subject bound to a
trigger token, with optional prior preservation; the result is a `checkpoint` artifact, a whole diffusers folder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field, model_validator

from loraforge.plugins import TRAINERS
from loraforge.registry.manifest import Manifest
from loraforge.train.base import TrainConfig
from loraforge.train.dreambooth_data import DreamBoothData, DreamBoothDataConfig
from loraforge.train.trainers.lora import LoraTrainer, text_encoder_components

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from loraforge.train.session import Session

LORA_ONLY = ("rank", "alpha", "target_modules")  # TrainConfig fields a full fine-tune has no use for
_LORA_ONLY_HELP = "LoRA only: a full fine-tune trains every weight and refuses a value other than the default."


class DreamBoothConfig(DreamBoothDataConfig):
    """DreamBooth's data and the fields of every trainer; the LoRA-only ones are refused when changed."""

    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate of AdamW (a full fine-tune moves every "
                                                           "weight: far lower than a LoRA's).")
    train_text_encoder: bool = Field(False, description="Also fine-tune the text encoders' own weights (SDXL: both).")
    save_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="dtype of the saved checkpoint's weights (fp32 keeps untrained parts bit-identical to an "
                            "fp32 base; choose the base's own dtype to keep its size).")
    # The LoRA fields keep TrainConfig's defaults (a recipe sharing them across methods still validates) and say
    # in --help that other values are refused.
    rank: int = Field(TrainConfig.model_fields["rank"].default, ge=1, description=_LORA_ONLY_HELP)
    alpha: Optional[float] = Field(TrainConfig.model_fields["alpha"].default, gt=0, description=_LORA_ONLY_HELP)
    target_modules: list[str] = Field(default_factory=TrainConfig.model_fields["target_modules"].default_factory,
                                      description=_LORA_ONLY_HELP)

    @model_validator(mode="after")
    def _refuse_lora_options(self) -> "DreamBoothConfig":
        fields = type(self).model_fields
        given = [f"{n}={getattr(self, n)!r}" for n in LORA_ONLY
                 if getattr(self, n) != fields[n].get_default(call_default_factory=True)]
        if given:
            what, it = ("is a LoRA option", "it") if len(given) == 1 else ("are LoRA options", "them")
            raise ValueError(f"{', '.join(given)} {what}, of no use to a full DreamBooth fine-tune, which trains the "
                             f"weights themselves; drop {it}, or train dreambooth_lora for a LoRA")
        return self


@TRAINERS.register("dreambooth", reference_url="https://arxiv.org/abs/2208.12242", version="1")
class DreamBoothTrainer(DreamBoothData, LoraTrainer):
    """Full DreamBooth: fine-tune the UNet (and optionally the text encoders) into a checkpoint."""

    # LoraTrainer supplies the caption dataset's batches (`_source`); `run` trains full weights, not a LoRA.
    config_class = DreamBoothConfig
    method = "dreambooth"
    families = ("sd1", "sdxl")
    artifact_kind = "checkpoint"
    supports_processes = False  # its checkpoint registration (finish_checkpoint) is not rank-aware yet

    def run(self, session: Session) -> list[Manifest]:
        from loraforge.formats.safetensors_io import dtype_from_name
        from loraforge.train.data import prepare_dataset
        from loraforge.train.loop import run_loop

        config, registry, output = session.config, session.registry, session.output
        data = prepare_dataset(registry, config.dataset, output=output, instance_prompt=config.instance_prompt)
        datasets = [data.manifest]
        prior = self.prior_data(session)  # the class images, with prior preservation
        if prior is not None:
            datasets.append(prior.manifest)
        session.load_model(full_precision=True)
        sources = [self._source(session, d) for d in [data] + ([prior] if prior else [])]
        components = ["unet", *text_encoder_components(session)]
        params = unfreeze(session, components)
        prompts = list(dict.fromkeys(data.captions))[:2]
        session.periodic = [("default", prompts, (1.0,))]
        step_fn = self.denoising_step(session, sources)

        try:
            result = run_loop(title=f"train {self.method} {output}", params=params, step_fn=step_fn,
                              samples_per_step=config.batch_size * len(sources), **session.loop_kwargs())
        finally:
            freeze(session, components)
        return [session.finish_checkpoint(output, datasets=datasets, metrics=result.metrics, validation_prompts=prompts,
                                          dtype=dtype_from_name(config.save_dtype))]


def unfreeze(session: Session, components: list[str]) -> dict[str, torch.nn.Parameter]:
    """Make every weight of `components` trainable (in train mode, as the reference DreamBooth script does; with
    gradient checkpointing also in the text encoders, whose checkpointing runs only in train mode); returns them
    named `<component>.<parameter>`, the names checkpoints and optimisers use."""
    params: dict[str, torch.nn.Parameter] = {}
    for component in components:
        module = getattr(session.model.pipe, component)
        module.requires_grad_(True)
        module.train()
        if component != "unet" and session.config.gradient_checkpointing:
            # transformers renamed it (the old name warns); older releases of our range have only the old one
            enable = getattr(module, "activation_checkpointing_enable", None) or module.gradient_checkpointing_enable
            enable()
        params.update({f"{component}.{n}": p for n, p in module.named_parameters()})
    return params


def freeze(session: Session, components: list[str]) -> None:
    """Back to frozen inference mode, for the validation images and the save."""
    for component in components:
        module = getattr(session.model.pipe, component)
        module.requires_grad_(False)
        module.eval()
