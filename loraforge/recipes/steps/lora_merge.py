"""`lora_merge:` steps: LoRA algebra (concat, svd, ties, dare) registered as one LoRA."""

from __future__ import annotations

from loraforge.recipes.steps import StepContext


def run(ctx: StepContext):
    from loraforge.ops.lora_merge import merge_loras

    return merge_loras(ctx.registry, ctx.spec, name=ctx.output, recipe=ctx.recipe_info, input_digest=ctx.input_digest)
