"""`lora_merge:` steps: LoRA algebra (concat, svd, ties, dare) registered as one LoRA."""

from __future__ import annotations

from loraforge.ops.specs import LoraMergeSpec
from loraforge.plugins import LORA_METHODS, STEP_KINDS
from loraforge.recipes.step_kind import (SpecReference, StepContext, StepKind, adapter_references,
                                         check_method_params)


@STEP_KINDS.register("lora_merge")
class LoraMergeStep(StepKind):
    """Combine LoRAs with a LoRA merge method."""

    spec_class = LoraMergeSpec

    def output_kind(self, spec: LoraMergeSpec) -> str:
        return "lora"

    def references(self, spec: LoraMergeSpec) -> list[SpecReference]:
        return adapter_references(spec.adapters, "lora")

    def plugins(self, spec: LoraMergeSpec):
        return [(LORA_METHODS, spec.method)]

    def check(self, recipe, step) -> None:
        check_method_params(recipe, step, LORA_METHODS)

    def run(self, ctx: StepContext):
        from loraforge.ops.lora_merge import merge_loras

        return merge_loras(ctx.registry, ctx.spec, name=ctx.output, recipe=ctx.recipe_info,
                           input_digest=ctx.input_digest)
