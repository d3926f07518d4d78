"""What a merge, LoRA merge or fuse is asked to do: frozen pydantic specs shared by CLI and recipes.

Help text lives on the fields and is reused by the CLI and the recipe docs.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

Component = Literal["unet", "transformer", "text_encoder", "vae"]
DType = Literal["fp32", "fp16", "bf16"]


class Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelInput(Spec):
    ref: str = Field(description="A checkpoint: registry reference, path, builtin:NAME or hf://org/name@rev.")
    weight: Optional[float] = Field(None, description="Merge weight (for weighted_sum: the α of this model).")


class AdapterInput(Spec):
    ref: str = Field(description="A LoRA or slider: registry reference, path or hf://org/name@rev.")
    weight: float = Field(1.0, description="Multiplier of the adapter's ΔW (a slider's scale); may be negative.")


class CheckpointMergeSpec(Spec):
    method: str = Field("weighted_sum", description="Merge method (see `loraforge methods`).")
    models: list[ModelInput] = Field(description="Input checkpoints; the first is the primary (A).", min_length=2)
    alpha: Optional[float] = Field(
        None, description="Interpolation / difference strength; defaults to the second model's weight, else 0.5.")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="Method parameters, e.g. density, drop_rate, seed, lambda.")
    block_weights: Optional[Union[list[float], dict[str, float]]] = Field(
        None, description="Per-block α of the denoiser: 25 numbers for SD1 (BASE, IN00..IN11, M00, OUT00..OUT11), "
                          "58 for FLUX.1 (BASE, double.0..double.18, single.0..single.37), or a mapping of block "
                          "name → weight (for Flux a group name, double or single, weighs all its blocks).")
    include: Optional[list[Component]] = Field(
        None, description="Only merge these components (default: the family's: SD's unet and text_encoder, "
                          "Flux's transformer alone; its VAE and text encoders are copied from the first model).")
    exclude: list[Component] = Field(["vae"], description="Components copied from the first model unmerged when "
                                                          "`include` is not given.")
    dtype: DType = Field("fp16", description="Output dtype; arithmetic is always fp32.")


class LoraMergeSpec(Spec):
    method: str = Field("svd", description="concat, svd, ties or dare (see `loraforge methods`).")
    adapters: list[AdapterInput] = Field(min_length=1, description="Adapters with weights.")
    rank: Optional[int] = Field(None, gt=0, description="Target rank (svd/ties/dare); concat keeps the sum of ranks.")
    params: dict[str, Any] = Field(default_factory=dict, description="Method parameters, e.g. density, seed.")


class FuseSpec(Spec):
    base: str = Field(description="Base checkpoint the adapters are baked into.")
    adapters: list[AdapterInput] = Field(min_length=1, description="Adapters with weights.")
    dtype: DType = Field("fp16", description="Output dtype.")


def make_spec(cls: type[Spec], **fields: Any) -> Spec:
    """Build a spec, turning a validation failure into a one-line ConfigError naming the field."""
    from pydantic import ValidationError

    from loraforge.errors import ConfigError

    try:
        return cls(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or cls.__name__
        raise ConfigError(f"invalid {where}: {err['msg']} (got {err.get('input')!r})") from None
