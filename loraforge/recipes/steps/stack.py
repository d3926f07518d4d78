"""`stack:` steps: adapters with weights on a base, combined into one LoRA or fused into a checkpoint."""

from __future__ import annotations

from loraforge.ops.specs import FuseSpec, LoraMergeSpec
from loraforge.recipes.steps import StepContext


def run(ctx: StepContext):
    spec = ctx.spec
    if spec.fuse:
        from loraforge.ops.fuse import fuse_loras

        fuse = FuseSpec(base=spec.base, adapters=spec.adapters, dtype=spec.dtype)
        return fuse_loras(ctx.registry, fuse, name=ctx.output, recipe=ctx.recipe_info, input_digest=ctx.input_digest)
    from loraforge.ops.lora_merge import merge_loras

    merge = LoraMergeSpec(method=spec.method, adapters=spec.adapters, rank=spec.rank)
    # The stack was declared on this base: say so, so `generate` and lineage know what it sits on.
    return merge_loras(ctx.registry, merge, name=ctx.output, recipe=ctx.recipe_info, input_digest=ctx.input_digest,
                       base=spec.base)
