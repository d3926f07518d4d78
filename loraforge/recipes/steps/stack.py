"""`stack:` steps: adapters with weights on a base, combined into one LoRA or fused into a checkpoint."""

from __future__ import annotations

from loraforge.ops.specs import FuseSpec, LoraMergeSpec
from loraforge.recipes.steps import StepContext
from loraforge.registry.manifest import BaseInfo


def run(ctx: StepContext):
    spec = ctx.spec
    if spec.fuse:
        from loraforge.ops.fuse import fuse_loras

        fuse = FuseSpec(base=spec.base, adapters=spec.adapters, dtype=spec.dtype)
        return fuse_loras(ctx.registry, fuse, name=ctx.output, recipe=ctx.recipe_info, input_digest=ctx.input_digest)
    from loraforge.ops.lora_merge import merge_loras
    from loraforge.registry.resolve import resolve_base

    merge = LoraMergeSpec(method=spec.method, adapters=spec.adapters, rank=spec.rank)
    manifest = merge_loras(ctx.registry, merge, name=ctx.output, recipe=ctx.recipe_info, input_digest=ctx.input_digest)
    if manifest.base is None or manifest.base.ref != spec.base:
        # The stack was declared on this base: say so, so `generate` and lineage know what it sits on.
        base = resolve_base(ctx.registry, spec.base)
        info = BaseInfo(ref=base.ref, digest=base.digest, family=base.family)
        manifest = _set_base(ctx.registry, manifest, info)
    return manifest


def _set_base(registry, manifest, info):
    from loraforge.registry.catalog import immediate

    manifest = manifest.model_copy(update={"base": info})
    with immediate(registry.db) as conn:
        conn.execute("UPDATE artifacts SET manifest = ? WHERE name = ? AND version = ?",
                     [manifest.to_json(), manifest.name, manifest.version])
    return manifest
