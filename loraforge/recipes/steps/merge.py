"""`merge:` steps: a streamed checkpoint merge registered as a checkpoint."""

from __future__ import annotations

from loraforge.recipes.steps import StepContext


def run(ctx: StepContext):
    from loraforge.ops.merge import merge_checkpoints

    return merge_checkpoints(ctx.registry, ctx.spec, name=ctx.output, recipe=ctx.recipe_info,
                             input_digest=ctx.input_digest)
