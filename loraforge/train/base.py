"""The trainer contract: a frozen pydantic config with the common fields, and the Trainer protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # pragma: no cover
    from loraforge.registry.manifest import Manifest, RecipeInfo
    from loraforge.registry.registry import Registry


class TrainConfig(BaseModel):
    """Fields every trainer shares; a trainer subclasses this with its own fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: str = Field("builtin:tiny-sd", description="Base model reference (builtin:NAME, path, Hub id or registry checkpoint).")
    base_config: Optional[str] = Field(
        None, description="Diffusers folder of the base's architecture whose configs and tokenizers a single-file "
                          "base is read with (needed offline for a single file that is not a builtin's).",
        json_schema_extra={"cli_aliases": ["--config"]})
    seed: int = Field(0, description="Random seed: the same seed and data give the same adapter.")
    steps: int = Field(500, ge=1, description="Number of optimiser steps.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="Learning-rate schedule after warm-up.")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: Optional[float] = Field(None, gt=0, description="LoRA alpha (scale = alpha / rank); default: equal to rank.")
    batch_size: int = Field(1, ge=1, description="Samples per optimiser step (before accumulation).")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches accumulated per optimiser step.")
    resolution: int = Field(512, ge=8, description="Training resolution in pixels (square).")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description="Autocast dtype on CUDA; auto = bf16 on CUDA, fp32 on CPU (fp16/bf16 are refused without CUDA).")
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps (0: never).")
    validation_prompts: list[str] = Field(default_factory=list, description="Prompts rendered into the validation grid (default: from the data).")
    validation_steps: int = Field(8, ge=1, description="Denoising steps of validation images.")
    validation_every: int = Field(0, ge=0, description="Also render validation images every N steps (0: only at the end).")
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], description="UNet module names (last segments) that get a LoRA.")
    train_text_encoder: bool = Field(False, description="Also train a LoRA on the text encoders' attention projections (SDXL: both; Flux: CLIP, T5 stays frozen).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass to save memory.")
    cache_latents: bool = Field(True, description="Cache VAE latents and text embeddings on disk (keyed by images, transform, text and model weights).")
    use_8bit_adam: bool = Field(False, description="Use bitsandbytes' 8-bit AdamW (needs CUDA and bitsandbytes; refused otherwise).")
    compile: bool = Field(False, description="torch.compile the UNet (opt-in; slower start, faster steps on GPU).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    processes: int = Field(1, ge=1, description="Train on N processes through accelerate (DDP: gloo on CPU, NCCL on one GPU each); batch_size is the global batch and must be a multiple of N; only the lora and dreambooth_lora trainers take more than 1.")


@runtime_checkable
class Trainer(Protocol):
    """A trainer registered in TRAINERS: train() registers and returns the artifacts it made."""

    config_class: type[TrainConfig]

    def train(self, config: TrainConfig, *, registry: "Registry", output: str,
              recipe: "RecipeInfo | None" = None, input_digest: str | None = None,
              resume: bool = False, progress: bool | None = None) -> list["Manifest"]:
        ...
