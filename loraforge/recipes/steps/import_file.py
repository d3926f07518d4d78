"""`import:` steps: a local file or folder imported into the registry (re-imported when its bytes change)."""

from __future__ import annotations

from pathlib import Path

from loraforge.recipes.steps import StepContext


def run(ctx: StepContext):
    from loraforge.registry.importer import import_artifact

    spec = ctx.spec
    # Recipe provenance and the input digest go in with the version: a version is never patched.
    return import_artifact(ctx.registry, Path(spec.path), ctx.output, kind=spec.kind, base=spec.base,
                           input_digest=ctx.input_digest, stamp=ctx.stamp)
