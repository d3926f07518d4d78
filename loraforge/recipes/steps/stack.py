"""`stack:` steps: adapters with weights on a base, combined into one LoRA or fused into a checkpoint."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from loraforge.ops.specs import AdapterInput, DType, FuseSpec, LoraMergeSpec
from loraforge.plugins import LORA_METHODS, STEP_KINDS
from loraforge.recipes.step_kind import (Spec, SpecReference, StepContext, StepDefaults, StepKind,
                                         adapter_references, fill_base)


class StackSpec(Spec):
    base: Optional[str] = Field(None, description="Checkpoint the adapters sit on (default: the recipe's base).")
    adapters: list[AdapterInput] = Field(min_length=1, description="Adapters with weights (a slider's weight is its scale).")
    fuse: bool = Field(False, description="Bake the stack into a checkpoint instead of combining it into one LoRA.")
    method: str = Field("concat", description="LoRA merge method when not fused; concat keeps the exact sum.")
    rank: Optional[int] = Field(None, gt=0, description="Target rank of the combined LoRA (svd/ties/dare).")
    dtype: DType = Field("fp16", description="Dtype of a fused checkpoint.")


@STEP_KINDS.register("stack")
class StackStep(StepKind):
    """Adapters with weights on a base: one combined LoRA, or fused into a checkpoint."""

    spec_class = StackSpec

    def output_kind(self, spec: StackSpec) -> str:
        return "checkpoint" if spec.fuse else "lora"

    def references(self, spec: StackSpec) -> list[SpecReference]:
        return [SpecReference(("base",), "model", spec.base), *adapter_references(spec.adapters, "lora")]

    def with_defaults(self, spec: StackSpec, defaults: StepDefaults) -> StackSpec:
        return fill_base(spec, defaults)

    def plugins(self, spec: StackSpec):
        return [] if spec.fuse else [(LORA_METHODS, spec.method)]

    def run(self, ctx: StepContext):
        spec = ctx.spec
        if spec.fuse:
            from loraforge.ops.fuse import fuse_loras

            fuse = FuseSpec(base=spec.base, adapters=spec.adapters, dtype=spec.dtype)
            return fuse_loras(ctx.registry, fuse, name=ctx.output, recipe=ctx.recipe_info,
                              input_digest=ctx.input_digest)
        from loraforge.ops.lora_merge import merge_loras

        merge = LoraMergeSpec(method=spec.method, adapters=spec.adapters, rank=spec.rank)
        # The stack was declared on this base: say so, so `generate` and lineage know what it sits on.
        return merge_loras(ctx.registry, merge, name=ctx.output, recipe=ctx.recipe_info,
                           input_digest=ctx.input_digest, base=spec.base)
