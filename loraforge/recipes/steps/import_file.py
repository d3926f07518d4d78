"""`import:` steps: a local file or folder imported into the registry (re-imported when its bytes change)."""

from __future__ import annotations

from pathlib import Path

from loraforge.recipes.steps import StepContext


def run(ctx: StepContext):
    from loraforge.registry.importer import import_artifact

    spec = ctx.spec
    manifest = import_artifact(ctx.registry, Path(spec.path), ctx.output, kind=spec.kind, base=spec.base)
    return _stamp_registered(ctx, manifest)


def _stamp_registered(ctx: StepContext, manifest):
    """Record recipe provenance and the input digest on an artifact registered by a helper without them."""
    from loraforge.registry.catalog import immediate

    manifest = ctx.stamp(manifest)
    with immediate(ctx.registry.db) as conn:
        conn.execute("UPDATE artifacts SET manifest = ?, input_digest = ? WHERE name = ? AND version = ?",
                     [manifest.to_json(), ctx.input_digest, manifest.name, manifest.version])
    return manifest
