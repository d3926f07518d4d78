"""`import:` steps: a local file or folder imported into the registry (re-imported when its bytes change)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from loraforge.plugins import STEP_KINDS
from loraforge.recipes.step_kind import Spec, SpecReference, StepContext, StepKind


class ImportSpec(Spec):
    path: str = Field(description="Local file or folder to import (its content digest is tracked).")
    kind: Optional[Literal["lora", "slider", "embedding", "checkpoint", "dataset"]] = Field(
        None, description="Default: detected.")
    base: Optional[str] = Field(None, description="Base model an adapter or embedding is checked against.")
    token: Optional[str] = Field(None, description=(
        "An embedding's prompt token (default: the file's own name, else the file name without suffix)."))


@STEP_KINDS.register("import")
class ImportStep(StepKind):
    """Import a local file or folder into the registry."""

    spec_class = ImportSpec

    def output_kind(self, spec: ImportSpec) -> Optional[str]:
        return spec.kind

    def references(self, spec: ImportSpec) -> list[SpecReference]:
        refs = [SpecReference(("path",), "path", spec.path)]
        if spec.base:
            refs.append(SpecReference(("base",), "model", spec.base))
        return refs

    def run(self, ctx: StepContext):
        from loraforge.registry.importer import import_artifact

        spec = ctx.spec
        # Recipe provenance and the input digest go in with the version: a version is never patched.
        return import_artifact(ctx.registry, Path(spec.path), ctx.output, kind=spec.kind, base=spec.base,
                               input_digest=ctx.input_digest, stamp=ctx.stamp, token=spec.token)
